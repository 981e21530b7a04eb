"""The smoke preset end to end through the real CLI, and resuming an interrupted run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from service.bundle import load_bundle
from tests.conftest import run_cli


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_smoke_run_writes_every_phase(smoke_run):
    log = _log(smoke_run)
    done = [r["phase"] for r in log if r.get("status") == "done"]
    assert done == ["baseline", "pretrain", "profile", "search", "finetune", "route", "twins", "multires", "shared_twins",
                    "coadapt",
                    "export",
                    "report"]  # route: off, a no-op
    assert [r["epoch"] for r in log if r["phase"] == "pretrain" and "epoch" in r] == [1, 2]
    assert [r["variant"] for r in log if r["phase"] == "search" and r.get("status") == "variant done"] == ["A", "B", "C"]
    assert all({"mean_reward", "nonzero_reward_share", "greedy_latency_ms", "alpha"} <= set(r)
               for r in log if r["phase"] == "search" and "step" in r)
    pretrain_epoch = next(r for r in log if r["phase"] == "pretrain" and "epoch" in r)
    assert {"train_loss", "train_top1", "val_top1_all", "val_top1_mobilenet_v2", "val_top1_cheapest"} <= set(pretrain_epoch)
    export = next(r for r in log if r["phase"] == "export" and "parity_max_abs_diff" in r)
    assert export["parity_max_abs_diff"] < 1e-4
    for phase in ("baseline", "pretrain", "search", "finetune"):
        assert torch.load(smoke_run / f"{phase}.pt", weights_only=False)["done"]
    table = json.loads((smoke_run / "latency.json").read_text())
    assert all(entry["latency_ms"] > 0 and entry["mflops"] > 0 for row in table["blocks"] for entry in row)

    bundle = load_bundle(smoke_run / "bundle")
    m = bundle.manifest
    assert [c.name for c in m.controllers] == ["A", "B", "C"] and m.default_controller in m.point_names
    for point in m.controllers:
        e = point.evaluation
        assert e.images == 200 and 0 <= e.top1 <= 1 and e.mean_measured_latency_ms > 0 and e.architectures >= 1
    assert m.frequent_architectures and m.profile.dispatch_ms >= 0
    static = load_bundle(smoke_run / "bundle-mobilenet_v2").manifest
    assert static.fixed_architecture == "1111" and static.search_space.num_modules == 1 and len(static.blocks) == 4
    assert static.evaluation.mean_measured_latency_ms > 0
    assert m.training["config"]["name"] == "smoke" and m.training["source_revision"]
    assert len(m.blocks) == m.search_space.num_cells * m.search_space.num_modules
    assert (smoke_run / "bundle" / "blocks" / "00_0.onnx").exists()


def test_report_measures_points_baseline_and_controls(smoke_run):
    report = json.loads((smoke_run / "report" / "report.json").read_text())
    cascades = {"cascade-0", "cascade-0.3", "cascade-1", "cascade-2", "cascade-top"}  # the twins' (tests/test_cascade.py)
    assert report["images"] == 200 and set(report["points"]) == {"A", "B", "C"} | cascades
    for point in report["points"].values():
        assert point["latency"]["per_block"]["mean_ms"] > 0 and point["latency"]["fused"]["mean_ms"] > 0
        assert -1 <= point["difficulty_spearman"] <= 1 and point["vs_baseline"]["low"] <= point["vs_baseline"]["high"]
    for control in report["controls"].values():
        assert 0 <= control["shuffled"]["top1"] <= 1 and control["static_twin"]["code"]
        for kind in ("shuffled", "static_twin"):  # timed as served (the plot's axis) and block by block
            assert control[kind]["latency"]["fused"]["mean_ms"] > 0 and control[kind]["latency"]["per_block"]["mean_ms"] > 0
    assert report["baseline"]["curve"] and report["baseline"]["latency"]["fused"]["mean_ms"] > 0
    table = (smoke_run / "report" / "FRONTIER.md").read_text()
    assert "MobileNetV2 baseline" in table and "| A |" in table and "| cascade-0.3 (cascade, " in table
    for png in ("frontier.png", "learning_curve.png", "difficulty.png"):
        assert (smoke_run / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_all_skips_finished_phases_and_redoes_the_rest(smoke_run, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle"))
    (run / "finetune.pt").unlink()
    # `all` skips every finished phase and redoes only finetune and export
    lines = len(_log(run))
    done = run_cli("instanas-train", "all", "--data", str(data_root), "--out", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    new = _log(run)[lines:]
    assert not [r for r in new if r["phase"] in ("baseline", "pretrain", "search") and "epoch" in r]
    assert [r["epoch"] for r in new if r["phase"] == "finetune" and "epoch" in r] == [1]
    assert (run / "bundle" / "manifest.json").exists() and (run / "bundle-mobilenet_v2" / "manifest.json").exists()
    variants = torch.load(run / "search.pt", weights_only=False)["variants"]
    assert [v["name"] for v in variants] == ["A", "B", "C"]
    first, last = variants[0]["controller"], variants[-1]["controller"]
    assert not all(torch.equal(first[k], last[k]) for k in first)  # each point's controller is its own
    kept = torch.load(run / "finetune.pt", weights_only=False)["controllers"]
    assert all(torch.equal(first[k], kept["A"][k].cpu()) for k in first)


def test_finetune_can_learn_from_the_baseline_as_teacher(smoke_run, data_root, tmp_path):
    """`finetune.teacher=baseline`: the points' paths also learn the frozen MobileNetV2's predictions,
    so the same seed and data end at other weights than labels alone; an unknown teacher is refused."""
    from training import finetune
    from training.config import from_dict
    from training.context import Context
    from training.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle*", "report", "finetune.pt"))
    saved = json.loads((run / "config.json").read_text())
    saved["finetune"]["teacher"] = "oracle"
    with pytest.raises(ValueError, match="finetune.teacher: 'oracle' is not one of 'none', 'baseline'"):
        from_dict(saved)  # at load, before any data is read
    saved["finetune"]["teacher"] = "baseline"
    taught = finetune.run(Context.open(RunDir(run, from_dict(saved)), str(data_root)))
    labels_only = torch.load(smoke_run / "finetune.pt", weights_only=False)["model"]
    assert set(taught["figures"]) == {"A", "B", "C"}
    assert any(not torch.equal(labels_only[k], taught["model"][k].cpu()) for k in labels_only)


def test_search_can_score_paths_with_batch_statistics(smoke_run, data_root):
    """`search.batchnorm=batch`: the rewarder scores sampled paths with each batch's own BatchNorm
    statistics and leaves the frozen meta-graph's running statistics as they were; an unknown value is refused."""
    import copy

    from training import search
    from training.batchnorm import batch_statistics
    from training.config import apply_overrides
    from training.context import Context
    from training.latency import load_table
    from training.reward import reward
    from training.rundir import RunDir

    ctx = Context.open(RunDir(smoke_run), str(data_root))
    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(ctx.run.require("pretrain")["model"])
    metagraph.eval().requires_grad_(False)
    cfg = ctx.config.search
    with pytest.raises(ValueError, match="search.batchnorm: 'median' is not one of 'running', 'batch'"):
        apply_overrides(copy.deepcopy(ctx.config), ["search.batchnorm=median"])
    cfg.batchnorm = "batch"
    rewarder = search.Rewarder(ctx, metagraph, load_table(ctx.run))
    x, y = next(iter(ctx.batches("train", 32, seed=5)))
    x = ctx.to_device(x)
    action = torch.rand(len(y), ctx.space.num_cells, ctx.space.num_modules, generator=torch.Generator().manual_seed(0)) < 0.5
    before = {k: v.clone() for k, v in metagraph.state_dict().items()}
    got, latency = rewarder(x, y, action, 0.0, 1e9, cfg)
    with torch.no_grad(), batch_statistics(metagraph):
        logits = metagraph.forward_selected(x, action)
    assert torch.equal(got, reward(logits.argmax(1) == y, latency, 0.0, 1e9, cfg.pos_weight, cfg.neg_weight))
    with torch.no_grad():
        assert not torch.allclose(logits, metagraph.forward_selected(x, action), atol=1e-3)  # other statistics
    assert all(torch.equal(v, metagraph.state_dict()[k]) for k, v in before.items())  # nothing written back


def test_the_papers_search_runs_and_its_points_finetune(smoke_run, data_root, tmp_path):
    """`search.mode=paper` (the published method: a falling latency bound, controller epochs
    alternating with meta-graph epochs) at smoke scale: each epoch logged and its controller kept,
    operating points taken from evenly spaced epochs, the slowest first, which fine-tuning trains."""
    from training import finetune, search
    from training.config import apply_overrides
    from training.context import Context
    from training.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle*", "report", "search.pt", "finetune.pt",
                                                                   "route.pt", "twins.pt"))
    config = apply_overrides(RunDir(run).config, ["search.mode=paper", "search.epochs=3", "search.steps_per_epoch=2",
                                                  "search.metagraph_steps=1"])
    ctx = Context.open(RunDir(run, config, reconfigure=True), str(data_root))
    state = search.run(ctx)
    assert state["done"] and state["mode"] == "paper"
    epochs = [r for r in _log(run) if r["phase"] == "search" and "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all(r["upper_ms"] >= r["lower_ms"] for r in epochs)
    assert epochs[0]["upper_ms"] >= epochs[-1]["upper_ms"]  # the bound falls
    assert [v["name"] for v in state["variants"]] == ["A", "B", "C"]
    assert search.run(ctx) is not None  # finished: returns its state, trains nothing
    assert len([r for r in _log(run) if r["phase"] == "search" and "epoch" in r]) == 3
    tuned = finetune.run(ctx)
    assert set(tuned["figures"]) == {"A", "B", "C"}


def test_cli_errors_are_clear(data_root, tmp_path):
    done = run_cli("instanas-train", "all", "--config", "no-such", "--data", str(data_root), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "neither a preset" in done.stderr
    done = run_cli("instanas-train", "all", "--config", "smoke", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "no train" in done.stderr
    done = run_cli("instanas-train", "export", "--data", str(data_root), "--out", str(tmp_path / "empty"))
    assert done.returncode == 2 and "run a phase with --config first" in done.stderr


def test_route_phase_exports_routers_that_choose_among_the_search_architectures(smoke_run, data_root, tmp_path):
    """`route.enabled`: one router trunk, a price per point; the bundle's controllers are the routers
    (the export checks them against PyTorch through the service's executor)."""
    from service import architecture
    from service.executor import Executor

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle*", "report"))
    sets = ["--set", "route.enabled=true", "--set", 'route.names=["A","B","C"]', "--set", "route.targets=[1.2,0.8,0.1]"]
    for phase in ("route", "export"):
        done = run_cli("instanas-train", phase, "--data", str(data_root), "--out", str(run), *sets)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = torch.load(run / "route.pt", weights_only=False)
    assert state["done"] and [v["name"] for v in state["variants"]] == ["A", "B", "C"]
    prices = [v["price"] for v in state["variants"]]
    assert prices == sorted(prices) and prices[-1] > 0  # the lower the target, the dearer latency
    log = _log(run)
    assert [r["epoch"] for r in log if r["phase"] == "route" and "epoch" in r] == [1, 2]
    assert all(r["parity_max_abs_diff"] < 1e-4 for r in log if r["phase"] == "export" and "parity_max_abs_diff" in r)
    bundle = load_bundle(run / "bundle")
    assert [c.name for c in bundle.manifest.controllers] == ["A", "B", "C"]
    executor = Executor(bundle)
    x = torch.randn(16, 3, 32, 32).numpy()
    for point in ("A", "B", "C"):
        codes = set(architecture.encode_many(executor.run(x, operating_point=point).executed))
        assert codes <= set(state["candidates"])
    # the cheapest target takes the cheapest candidate for every image
    latency = {c: lat for c, lat in zip(state["candidates"], torch.load(run / "route.pt", weights_only=False)
                                        ["model"]["latency_ms"].tolist())}
    assert set(architecture.encode_many(executor.run(x, operating_point="C").executed)) == {min(latency, key=latency.get)}
    # other targets later: the trained router is priced again, not trained again
    epochs = len([r for r in _log(run) if r["phase"] == "route" and "epoch" in r])
    again = run_cli("instanas-train", "route", "--data", str(data_root), "--out", str(run), "--reconfigure",
                    *sets[:4], "--set", "route.targets=[1.2,0.8,0.3]")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [v["target_ratio"] for v in torch.load(run / "route.pt", weights_only=False)["variants"]] == [1.2, 0.8, 0.3]
    assert len([r for r in _log(run) if r["phase"] == "route" and "epoch" in r]) == epochs


def test_router_price_calibration_by_hand():
    import numpy as np

    from training.route import calibrate

    p = np.array([[0.9, 0.6], [0.9, 0.85], [0.7, 0.2]])  # P(right) with a slow (2 ms) and a fast (1 ms) candidate
    latency = np.array([2.0, 1.0])
    assert calibrate(p, latency, 2.0) == 0.0  # all slow fits
    # 1.67 ms: one image may go fast; the one that loses least (row 1: 0.05) goes first, at a price just above 0.05
    price = calibrate(p, latency, 5 / 3)
    assert 0.05 <= price < 0.051
    assert ((p - price * latency).argmax(1) == [0, 1, 0]).all()
    assert ((p - calibrate(p, latency, 1.0) * latency).argmax(1) == 1).all()


def test_controller_points_served_only_where_their_routes_beat_shuffled_ones_by_hand():
    from training.controls import instance_aware, served

    static = {"architectures": 1}
    aware = {"architectures": 2, "point_minus_shuffled": {"difference": 0.02, "low": 0.004, "high": 0.03}}
    chance = {"architectures": 3, "point_minus_shuffled": {"difference": 0.01, "low": -0.002, "high": 0.02}}
    assert instance_aware(static) and instance_aware(aware) and not instance_aware(chance)
    assert served({"A": static, "B": chance, "C": aware}, others=0) == ["A", "C"]
    assert served({"A": static, "B": chance, "C": aware}, others=2, required=False) == ["A", "B", "C"]
    assert served({"B": chance}, others=1) == []  # the cascades are the bundle's points
    assert served({"B": chance}, others=0) == ["B"]  # never a bundle without an operating point


def test_export_serves_a_controller_point_only_where_it_beats_its_shuffled_routes(smoke_run, data_root, tmp_path):
    """`export.instance_aware_only` (on but in the smoke preset): each search point's control on
    validation is in the manifest, and only the points that pass it are served."""
    from training.controls import instance_aware

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle*", "report"))
    done = run_cli("instanas-train", "export", "--data", str(data_root), "--out", str(run),
                   "--set", "export.instance_aware_only=true")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    manifest = load_bundle(run / "bundle").manifest
    verdicts = manifest.training["controller_controls"]
    assert list(verdicts) == ["A", "B", "C"]
    finetuned = torch.load(run / "finetune.pt", weights_only=False)["figures"]
    for name, figures in verdicts.items():
        assert figures["served"] == instance_aware(figures)
        if figures["architectures"] > 1:  # the point's own routes: its validation top-1 as fine-tuning measured it
            assert figures["top1"] == pytest.approx(finetuned[name]["top1"])
            assert 0 <= figures["shuffled_top1"] <= 1
    assert [c.name for c in manifest.controllers] == [name for name, f in verdicts.items() if f["served"]]
    assert manifest.default_controller in manifest.point_names
    logged = [r for r in _log(run) if r.get("controller_point")]
    assert {r["controller_point"]: r["served"] for r in logged} == {n: f["served"] for n, f in verdicts.items()}


def test_routes_that_ignore_what_the_image_shows_do_not_pass_the_control(smoke_run, data_root, tmp_path):
    """A point that deals two architectures by a coin of each image's own (its brightness, no sign
    of difficulty) runs both, and its control finds it no better than the same routes shuffled."""
    import numpy as np

    from service import architecture
    from training.config import load_config
    from training.context import Context
    from training.controls import instance_aware, validation_control
    from training.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle*", "report"))
    ctx = Context.open(RunDir(run, load_config("smoke", [])), str(data_root))
    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(torch.load(run / "finetune.pt", weights_only=False)["model"])
    space = ctx.space
    pair = torch.from_numpy(np.stack([architecture.mobilenet_v2(space), architecture.cheapest(space)])).float()

    def coin(x):  # (N, cells, modules) "probabilities": 1 where the chosen architecture runs a module
        return pair[(x.mean((1, 2, 3)) > x.mean()).long()]

    figures = validation_control(ctx, metagraph, coin)
    assert figures["architectures"] == 2
    assert figures["point_minus_shuffled"]["low"] <= 0 <= figures["point_minus_shuffled"]["high"]
    assert not instance_aware(figures)
    assert validation_control(ctx, metagraph, lambda x: pair[0].expand(len(x), *pair[0].shape)) == {"architectures": 1}
