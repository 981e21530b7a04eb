"""The smoke preset end to end through the real CLI, and resuming an interrupted run."""

from __future__ import annotations

import json
import shutil

import torch

from service.bundle import load_bundle
from tests.conftest import run_cli


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_smoke_run_writes_every_phase(smoke_run):
    log = _log(smoke_run)
    done = [r["phase"] for r in log if r.get("status") == "done"]
    assert done == ["baseline", "pretrain", "profile", "search", "finetune", "export"]
    assert [r["epoch"] for r in log if r["phase"] == "pretrain" and "epoch" in r] == [1, 2]
    assert [r["epoch"] for r in log if r["phase"] == "search" and "epoch" in r] == [1, 2]
    pretrain_epoch = next(r for r in log if r["phase"] == "pretrain" and "epoch" in r)
    assert {"loss", "train_top1", "top1_all", "top1_mobilenet_v2", "top1_cheapest"} <= set(pretrain_epoch)
    export = next(r for r in log if r["phase"] == "export" and "parity_max_abs_diff" in r)
    assert export["parity_max_abs_diff"] < 1e-4
    for phase in ("pretrain", "search", "finetune"):
        assert torch.load(smoke_run / f"{phase}.pt", weights_only=False)["done"]
    table = json.loads((smoke_run / "latency.json").read_text())
    assert all(entry["latency_ms"] > 0 and entry["mflops"] > 0 for row in table["blocks"] for entry in row)

    bundle = load_bundle(smoke_run / "bundle")
    m = bundle.manifest
    assert m.default_controller == "default" and m.controller().evaluation.images == 200
    assert 0 <= m.controller().evaluation.top1 <= 1
    assert m.training["config"]["name"] == "smoke" and m.training["source_revision"]
    assert len(m.blocks) == m.search_space.num_cells * m.search_space.num_modules
    assert (smoke_run / "bundle" / "blocks" / "00_0.onnx").exists()


def test_an_interrupted_run_resumes_where_it_stopped(smoke_run, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("bundle"))
    # as if the process died after the first pre-training epoch
    state = torch.load(run / "pretrain.pt", weights_only=False)
    state.update(epoch=1, done=False)
    torch.save(state, run / "pretrain.pt")
    (run / "finetune.pt").unlink()
    lines = len(_log(run))
    done = run_cli("instanas-train", "pretrain", "--data", str(data_root), "--out", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    new = _log(run)[lines:]
    assert [r["epoch"] for r in new if r["phase"] == "pretrain" and "epoch" in r] == [2]
    # `all` then skips the finished search and redoes only finetune and export, here with the
    # controller of the first search epoch (a slower point of the frontier)
    lines = len(_log(run))
    done = run_cli("instanas-train", "all", "--data", str(data_root), "--out", str(run),
                   "--set", "finetune.controller_epoch=1")
    assert done.returncode == 0, done.stderr[-2000:]
    new = _log(run)[lines:]
    assert not [r for r in new if r["phase"] in ("pretrain", "search") and "epoch" in r]
    assert [r["epoch"] for r in new if r["phase"] == "finetune" and "epoch" in r] == [1]
    assert (run / "bundle" / "manifest.json").exists()
    history = torch.load(run / "search.pt", weights_only=False)["history"]
    first, last = history[0]["controller"], history[-1]["controller"]
    assert not all(torch.equal(first[k], last[k]) for k in first)  # each epoch's controller is its own
    kept = torch.load(run / "finetune.pt", weights_only=False)["controller"]
    assert all(torch.equal(first[k], kept[k].cpu()) for k in first)


def test_cli_errors_are_clear(data_root, tmp_path):
    done = run_cli("instanas-train", "all", "--config", "no-such", "--data", str(data_root), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "neither a preset" in done.stderr
    done = run_cli("instanas-train", "all", "--config", "smoke", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "no train" in done.stderr
    done = run_cli("instanas-train", "export", "--data", str(data_root), "--out", str(tmp_path / "empty"))
    assert done.returncode == 2 and "run a phase with --config first" in done.stderr


def test_resumed_pretraining_equals_an_uninterrupted_one(data_root, cache_dir, tmp_path):
    """A run killed right after an epoch's checkpoint, resumed by a fresh process, ends bit-identical."""
    import pytest

    from training import pretrain
    from training.config import load_config
    from training.context import Context
    from training.rundir import RunDir

    class Killed(Exception):
        pass

    class DiesAfterFirstEpoch(RunDir):
        def save(self, phase, state):
            super().save(phase, state)
            if state["epoch"] == 1:
                raise Killed

    config = load_config("smoke", ["data.train_limit=128", "data.test_limit=64", "pretrain.sampling=sparse"])
    pretrain.run(Context.open(RunDir(tmp_path / "full", config), str(data_root)))
    with pytest.raises(Killed):
        pretrain.run(Context.open(DiesAfterFirstEpoch(tmp_path / "cut", config), str(data_root)))
    pretrain.run(Context.open(RunDir(tmp_path / "cut"), str(data_root)))  # fresh objects, saved config
    full = torch.load(tmp_path / "full" / "pretrain.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "pretrain.pt", weights_only=False)
    assert cut["done"] and cut["epoch"] == 2
    assert all(torch.equal(full["metagraph"][k], cut["metagraph"][k]) for k in full["metagraph"])
