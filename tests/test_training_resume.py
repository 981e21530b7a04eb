"""Runs that outlive their process: killed at any step, even inside a save, they resume
bit-identical; a run's config is fixed once a phase has started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import BIN
from training import baseline, pretrain
from training.config import load_config
from training.context import Context
from training.rundir import RunDir, RunError

SMOKE = ["data.train_limit=256", "data.val_images=64", "data.test_limit=64", "baseline.epochs=2", "pretrain.epochs=2",
         "checkpoint_steps=1"]
PHASES = {"baseline": baseline, "pretrain": pretrain}


class Killed(Exception):
    pass


def _dies_at(save_number: int, during_save: bool):
    class DiesAtSave(RunDir):
        saves = 0

        def save(self, phase, state):
            DiesAtSave.saves += 1
            if DiesAtSave.saves == save_number:
                if during_save:  # half a file written, then the process is gone
                    self.checkpoint(phase).with_suffix(".pt.tmp").write_bytes(b"\x80\x02partial")
                raise Killed
            super().save(phase, state)
    return DiesAtSave


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(data_root, cache_dir, tmp_path_factory):
    """A run folder where baseline, then the pre-training warm-started from it, ran without a break."""
    out = tmp_path_factory.mktemp("full")
    ctx = Context.open(RunDir(out, load_config("smoke", SMOKE)), str(data_root))
    baseline.run(ctx)
    pretrain.run(ctx)
    return out


@pytest.mark.parametrize("phase,save_number,during_save",
                         [("baseline", 3, False), ("baseline", 6, True), ("pretrain", 2, True), ("pretrain", 7, False)])
def test_killed_phase_resumes_bit_identical(uninterrupted, data_root, tmp_path, phase, save_number, during_save):
    config = load_config("smoke", SMOKE)
    if phase == "pretrain":  # warm-started from the same finished baseline
        shutil.copy(uninterrupted / "baseline.pt", tmp_path / "baseline.pt")
    with pytest.raises(Killed):
        PHASES[phase].run(Context.open(_dies_at(save_number, during_save)(tmp_path, config), str(data_root)))
    state = torch.load(tmp_path / f"{phase}.pt", weights_only=False)
    assert not state["done"]
    PHASES[phase].run(Context.open(RunDir(tmp_path, config), str(data_root)))  # the same command again
    full, cut = _weights(uninterrupted / f"{phase}.pt"), _weights(tmp_path / f"{phase}.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    curve = torch.load(tmp_path / f"{phase}.pt", weights_only=False)["curve"]
    assert [c["epoch"] for c in curve] == [1, 2]


def test_sigkill_of_a_real_process_resumes_bit_identical(uninterrupted, data_root, tmp_path):
    cmd = [str(BIN / "instanas-train"), "baseline", "--config", "smoke", "--data", str(data_root),
           "--out", str(tmp_path), *[a for s in SMOKE for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "baseline.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    full, cut = _weights(uninterrupted / "baseline.pt"), _weights(tmp_path / "baseline.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_a_changed_config_is_refused_once_its_phase_started(data_root, tmp_path):
    config = load_config("smoke", SMOKE)
    RunDir(tmp_path, config)
    RunDir(tmp_path, load_config("smoke", [*SMOKE, "baseline.lr=0.5"]))  # nothing started: taken
    torch.save({"done": False}, tmp_path / "baseline.pt")
    with pytest.raises(RunError, match=r"baseline.lr: 0.5 -> 0.05 \(phase baseline already started\)"):
        RunDir(tmp_path, config)
    with pytest.raises(RunError, match="data.val_images"):  # shapes every phase
        RunDir(tmp_path, load_config("smoke", [*SMOKE[:1], "data.val_images=32", *SMOKE[2:], "baseline.lr=0.5"]))
    RunDir(tmp_path, load_config("smoke", [*SMOKE, "baseline.lr=0.5", "search.lr=0.1", "threads=1"]))  # not started
    assert json.loads((tmp_path / "config.json").read_text())["search"]["lr"] == 0.1
    forced = RunDir(tmp_path, config, reconfigure=True)
    assert forced.config.baseline.lr == 0.05
    changes = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert changes[-1]["phase"] == "config" and changes[-1]["forced"] is True


def test_cli_refuses_a_changed_config_on_resume(data_root, tmp_path):
    run = [str(BIN / "instanas-train"), "baseline", "--data", str(data_root), "--out", str(tmp_path)]
    RunDir(tmp_path, load_config("smoke", SMOKE))
    torch.save({"done": False}, tmp_path / "baseline.pt")
    done = subprocess.run([*run, "--config", "smoke", "--set", "baseline.epochs=5"], capture_output=True, text=True,
                          env={**os.environ}, timeout=120)
    assert done.returncode == 2 and "refusing to change" in done.stderr and "--reconfigure" in done.stderr


def test_cli_reconfigure_resumes_a_run_on_its_saved_config(uninterrupted, data_root, tmp_path):
    """A run whose saved config was changed with --reconfigure after a phase finished (its
    checkpoint stamped with the old value) goes on with `--reconfigure` alone, no --config."""
    for name in ("config.json", "baseline.pt"):
        shutil.copy(uninterrupted / name, tmp_path / name)
    RunDir(tmp_path, load_config("smoke", [*SMOKE, "baseline.lr=0.5"]), reconfigure=True)
    run = [str(BIN / "instanas-train"), "baseline", "--data", str(data_root), "--out", str(tmp_path)]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "baseline.lr: 0.05 in the checkpoint, 0.5 in this run" in refused.stderr
    taken = subprocess.run([*run, "--reconfigure"], capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr[-2000:]


def test_validation_split_is_held_out_of_training(data_root, cache_dir, tmp_path):
    ctx = Context.open(RunDir(tmp_path, load_config("smoke", ["data.train_limit=null", "data.val_images=1000"])),
                       str(data_root))
    assert len(ctx.val) == 1000 and len(ctx.train) == 49000
    assert (torch.bincount(torch.from_numpy(ctx.val.labels)) == 100).all()
    train_rows = {row.tobytes() for row in ctx.train.images[:, 0, :, :].reshape(len(ctx.train), -1)}
    assert not any(row.tobytes() in train_rows for row in ctx.val.images[:, 0, :, :].reshape(1000, -1))


def test_warm_start_makes_the_meta_graph_the_baseline(uninterrupted, data_root):
    """Before any pre-training step, the all-modules and MobileNetV2 paths compute the baseline's logits."""
    from training.evaluate import fixed_policy
    from training.pretrain import fixed_paths, warm_start

    ctx = Context.open(RunDir(uninterrupted), str(data_root))
    reference = baseline.load(ctx)
    metagraph = ctx.new_metagraph().eval()
    warm_start(metagraph, reference.state_dict())
    x, _ = next(iter(ctx.batches("val", 32)))
    with torch.no_grad():
        expected = reference.forward_selected(x, torch.ones(32, ctx.space.num_cells, 1, dtype=torch.bool))
        for name in ("all", "mobilenet_v2"):
            got = metagraph.forward_selected(x, fixed_policy(fixed_paths(ctx.space)[name])(x))
            assert torch.allclose(got, expected, atol=1e-5), name


def test_a_finished_phase_given_more_epochs_goes_on_from_its_weights(uninterrupted, data_root, tmp_path):
    """`--reconfigure --set pretrain.epochs=3` on a finished 2-epoch pre-training: one more epoch,
    from its weights (here with the baseline as the sampled paths' teacher)."""
    for name in ("config.json", "baseline.pt", "pretrain.pt"):
        shutil.copy(uninterrupted / name, tmp_path / name)
    more = load_config("smoke", [*SMOKE, "pretrain.epochs=3", "pretrain.teacher=baseline"])
    with pytest.raises(RunError, match="pretrain.epochs: 2 -> 3"):
        RunDir(tmp_path, more)
    torch.save({"done": True}, tmp_path / "search.pt")  # a later phase built on the 2-epoch weights
    with pytest.raises(RunError, match="search were built on it"):
        pretrain.run(Context.open(RunDir(tmp_path, more, reconfigure=True), str(data_root)))
    (tmp_path / "search.pt").unlink()
    state = pretrain.run(Context.open(RunDir(tmp_path, more, reconfigure=True), str(data_root)))
    assert state["done"] and [c["epoch"] for c in state["curve"]] == [1, 2, 3]
    before, after = _weights(uninterrupted / "pretrain.pt"), state["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    again = pretrain.run(Context.open(RunDir(tmp_path, more), str(data_root)))  # finished: nothing more to do
    assert all(torch.equal(again["model"][k], after[k]) for k in after)
    with pytest.raises(ValueError, match="pretrain.teacher: 'oracle' is not one of 'all', 'baseline'"):
        load_config("smoke", [*SMOKE, "pretrain.epochs=4", "pretrain.teacher=oracle"])


def test_a_setting_added_since_the_run_started_is_not_a_change(tmp_path):
    """A config.json written before a key existed resumes: the key had its default then."""
    config = load_config("smoke", SMOKE)
    RunDir(tmp_path, config)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["pretrain"]["teacher"]  # as written before pretrain.teacher existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    torch.save({"done": False}, tmp_path / "pretrain.pt")
    RunDir(tmp_path, config)  # the default, "all": what that run did
    with pytest.raises(RunError, match="pretrain.teacher: 'all' -> 'baseline'"):
        RunDir(tmp_path, load_config("smoke", [*SMOKE, "pretrain.teacher=baseline"]))
