"""Phase `shared_twins`: the baseline trained at every resolution at once, one set of convolutions
and batch norms per resolution, and its networks tried as cascade stages by the export."""

from __future__ import annotations

import json

import torch

from service.bundle import load_bundle

from .helpers import assert_trained_apart_per_resolution


def test_shared_twins_trains_one_baseline_at_every_resolution(smoke_run):
    state = torch.load(smoke_run / "shared_twins.pt", weights_only=False)
    [epoch] = state["curve"]  # the smoke preset: one epoch
    assert {"val_top1_16", "val_top1_32"} <= set(epoch)
    assert set(state["figures"]) == {"val_top1_16_shared", "val_top1_16_separate", "val_top1_32_shared",
                                     "val_top1_32_separate"}
    assert state["figures"]["val_top1_16_shared"] == epoch["val_top1_16"], "the end figures are the last epoch's"
    baseline = torch.load(smoke_run / "baseline.pt", weights_only=False)["model"]
    separate = torch.load(smoke_run / "baseline.pt", weights_only=False)["figures"]["val_top1"]
    assert state["figures"]["val_top1_32_separate"] == separate
    assert_trained_apart_per_resolution(state["model"], baseline, "the baseline")


def test_the_export_tries_the_shared_twin_at_both_ends(smoke_run):
    m = load_bundle(smoke_run / "bundle").manifest
    first = m.training["first_stages"]["mobilenet_v2-shared@16"]  # a first-stage candidate, with its figures
    assert 0 <= first["top1"] <= 1 and first["latency_ms"] > 0
    log = [json.loads(line) for line in (smoke_run / "log.jsonl").read_text().splitlines()]
    [decision] = [r for r in log if r["phase"] == "export" and "shared_candidate" in r]
    assert decision["shared_candidate"] == (decision["shared_val_top1"] > decision["baseline_val_top1"])
    lasts = {stage.network for point in m.cascades for stage in point.stages[1:]}
    assert decision["shared_candidate"] or "mobilenet_v2-shared" not in lasts, "a last stage only where it is better"
    for network in m.networks:
        if network.name.startswith("mobilenet_v2-shared"):
            sub = load_bundle(smoke_run / "bundle" / network.path).manifest
            assert sub.preprocessing.input_size == network.resolution and sub.fixed_architecture
    report = json.loads((smoke_run / "report" / "report.json").read_text())
    assert set(report["shared_twins"]) >= {"val_top1_16_shared", "val_top1_16_separate"}
    assert "phase `shared_twins`" in (smoke_run / "report" / "FRONTIER.md").read_text()
