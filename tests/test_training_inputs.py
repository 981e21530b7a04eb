"""Training refuses bad inputs with a clear message before it trains: datasets (a missing folder,
an unreadable or undecodable image, an empty class, a checksum mismatch) and checkpoints (corrupted,
written by another phase, or by a run with another config). Through the CLI: exit status 2, one
message, no traceback."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import BIN
from training import data as datasets
from training.config import apply_overrides, load_config
from training.rundir import RunDir, RunError

CLASSES = ("cat", "dog", "frog")


def make_split(root: Path, per_class: int = 2, classes=CLASSES) -> Path:
    """root/<class>/<n>.png: tiny random 32x32 images."""
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("INSTANAS_CACHE", str(tmp_path / "cache"))
    make_split(tmp_path / "data" / "train")
    make_split(tmp_path / "data" / "test")
    return tmp_path / "data"


def train_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "instanas-train"), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "INSTANAS_CACHE": str(cache), "OMP_NUM_THREADS": "1"})


def test_a_good_tiny_dataset_loads(data_root):
    train = datasets.load(data_root, split="train")
    assert train.classes == sorted(CLASSES) and len(train) == 6


def test_missing_folder(data_root):
    with pytest.raises(FileNotFoundError, match="no train data"):
        datasets.load(data_root / "nowhere", split="train")


def test_undecodable_images_are_all_named(data_root):
    (data_root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (data_root / "train" / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(datasets.DataError) as info:
        datasets.load(data_root, split="train")
    message = str(info.value)
    assert "2 of 8 images cannot be decoded" in message
    assert "dog/broken.jpg" in message and "cat/empty.png" in message


def test_unreadable_image_as_root_too(data_root, monkeypatch):
    """Whoever runs it: an image the OS refuses to read (simulated: reading it raises PermissionError)."""
    victim = data_root / "train" / "frog" / "1.png"
    original = Path.read_bytes

    def read_bytes(self):
        if self == victim:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(datasets.DataError, match=r"1 images cannot be read:\n  .*frog/1.png: Permission denied"):
        datasets.load(data_root, split="train")


def test_empty_class_folder(data_root):
    (data_root / "train" / "horse").mkdir()
    (data_root / "train" / "horse" / "notes.txt").write_text("no images here")
    with pytest.raises(datasets.DataError, match="class folder horse has no images"):
        datasets.load(data_root, split="train")


def test_empty_class_in_an_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANAS_CACHE", str(tmp_path / "cache"))
    split = make_split(tmp_path / "src" / "train")
    (split / "horse").mkdir()
    out = tmp_path / "data"
    out.mkdir()
    with tarfile.open(out / "train.tar.gz", "w:gz") as tar:
        tar.add(split, arcname="train")
    with pytest.raises(datasets.DataError, match="class folder horse has no images"):
        datasets.load(out, split="train")


def test_damaged_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANAS_CACHE", str(tmp_path / "cache"))
    split = make_split(tmp_path / "src" / "train")
    out = tmp_path / "data"
    out.mkdir()
    with tarfile.open(out / "train.tar.gz", "w:gz") as tar:
        tar.add(split, arcname="train")
    data = (out / "train.tar.gz").read_bytes()
    (out / "train.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(datasets.DataError, match="the archive cannot be read"):
        datasets.load(out, split="train")


def test_checksum_mismatch_is_reported_by_the_cli_before_training(tmp_path):
    split = make_split(tmp_path / "src" / "train")
    out = tmp_path / "data"
    out.mkdir()
    for name in ("train", "test"):
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(split, arcname=name)
    (out / "SHA256SUMS").write_text("0" * 64 + "  train.tar.gz\n")
    done = train_cli("baseline", "--config", "smoke", "--data", str(out), "--out", str(tmp_path / "run"),
                     cache=tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    assert "does not match" in done.stderr and "SHA256SUMS" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "baseline.pt").exists()  # nothing trained


def test_a_broken_image_is_reported_by_the_cli_before_training(data_root, tmp_path):
    (data_root / "test" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    done = train_cli("baseline", "--config", "smoke", "--set", SMALL, "--data", str(data_root), "--out",
                     str(tmp_path / "run"), cache=tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    assert "cat/bad.png" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "baseline.pt").exists()


# --- checkpoints -------------------------------------------------------------------------------------------


SMALL = "data.val_images=3"  # the smoke preset holds out 100 images; these datasets have 6


def smoke_run(path: Path, *overrides: str) -> RunDir:
    return RunDir(path, apply_overrides(load_config("smoke"), [SMALL, *overrides]))


def test_a_checkpoint_round_trips_with_its_stamp(tmp_path):
    run = smoke_run(tmp_path / "run")
    run.save("baseline", {"model": {"w": torch.zeros(2)}, "done": True})
    state = run.load("baseline")
    assert state["done"] and state["_run"]["phase"] == "baseline"
    assert RunDir(tmp_path / "run").load("baseline")["done"]  # resumed with the saved config


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a dict"])
def test_a_corrupted_checkpoint_is_refused(tmp_path, damage):
    run = smoke_run(tmp_path / "run")
    run.save("baseline", {"model": {"w": torch.zeros(1000)}, "done": True})
    path = run.checkpoint("baseline")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(RunError, match="baseline") as info:
        run.load("baseline")
    assert str(tmp_path / "run" / "baseline.pt") in str(info.value)


def test_a_checkpoint_of_another_phase_is_refused(tmp_path):
    run = smoke_run(tmp_path / "run")
    run.save("pretrain", {"model": {}, "done": True})
    run.checkpoint("pretrain").rename(run.checkpoint("baseline"))
    with pytest.raises(RunError, match="written by phase 'pretrain', not 'baseline'"):
        run.load("baseline")


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    other = smoke_run(tmp_path / "other", "space.width_multiplier=0.5")
    other.save("baseline", {"model": {}, "done": True})
    run = smoke_run(tmp_path / "run")
    (run.path / "baseline.pt").write_bytes(other.checkpoint("baseline").read_bytes())
    with pytest.raises(RunError, match=r"another config(.|\n)*space.width_multiplier: 0.5 in the checkpoint"):
        run.load("baseline")
    # --reconfigure accepts other settings, never another shape
    other_lr = smoke_run(tmp_path / "lr", "baseline.lr=0.5")
    other_lr.save("baseline", {"model": {}, "done": True})
    (run.path / "baseline.pt").write_bytes(other_lr.checkpoint("baseline").read_bytes())
    with pytest.raises(RunError, match="baseline.lr"):
        run.load("baseline")
    assert RunDir(run.path, run.config, reconfigure=True).load("baseline")["done"]
    (run.path / "baseline.pt").write_bytes(other.checkpoint("baseline").read_bytes())
    with pytest.raises(RunError, match="space.width_multiplier"):
        RunDir(run.path, run.config, reconfigure=True).load("baseline")


def test_a_corrupted_checkpoint_is_reported_by_the_cli(data_root, tmp_path):
    run = smoke_run(tmp_path / "run")
    run.checkpoint("baseline").write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    done = train_cli("pretrain", "--data", str(data_root), "--out", str(run.path), cache=tmp_path / "cache")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "baseline.pt is not a readable checkpoint" in done.stderr and "Traceback" not in done.stderr


# Every closed choice of the config, with a wrong value: refused at load, key and choices named.
_CHOICES = [
    ("space.layout", "'mobilenet_v2', 'tiny'"),
    ("space.combine", "'mean', 'sum'"),
    ("pretrain.sampling", "'drop_path', 'sparse', 'sandwich'"),
    ("pretrain.teacher", "'all', 'baseline'"),
    ("search.mode", "'paper', 'variants'"),
    ("search.entropy", "'bernoulli', 'one_sided'"),
    ("search.batchnorm", "'running', 'batch'"),
    ("finetune.teacher", "'none', 'baseline'"),
    ("coadapt.confidence", "'max_softmax', 'margin'"),
]


@pytest.mark.parametrize("key, choices", _CHOICES)
def test_a_choice_not_offered_is_refused_at_load(key, choices):
    with pytest.raises(ValueError, match=f"{key}: 'nope' is not one of {choices}"):
        load_config("smoke", [f"{key}=nope"])


@pytest.mark.parametrize("override, message", [
    ("baseline.epochs=1.5", "baseline.epochs: 1.5 is not an integer"),
    ("baseline.epochs=-1", "baseline.epochs: -1 must be 0 or more"),
    ("baseline.lr=0", "baseline.lr: 0 must be above 0"),
    ("data.batch_size=0", "data.batch_size: 0 must be above 0"),
    ("data.train_limit=null", None),
    ("route.enabled=yes", "route.enabled: 'yes' is not true or false"),
    ("controller.channels=[8,8]", r"controller.channels: \[8, 8\] needs 3 items"),
    ("twins.resolutions=[24]", r"twins.resolutions: 24 must divide space.input_size \(32\)"),
    ("multires.resolutions=[32]", r"multires.resolutions: 32 must divide space.input_size \(32\) and be below it"),
    ("multires.resolutions=[16,16]", r"multires.resolutions: \[16, 16\] names a resolution twice"),
    ("twins.resolutions=[\"16\"]", "twins.resolutions: item '16' is not an integer"),
    ("twins.resolutions=[]", "coadapt.epochs: co-adaptation fine-tunes a cascade's last stage"),
    ("coadapt.share=1", r"coadapt.share: 1 must lie between 0 and 1"),
    ("coadapt.share=0", r"coadapt.share: 0 must lie between 0 and 1"),
    ("device=gpu", "device: 'gpu' is not one of 'auto', 'cpu', 'cuda'"),
    ("space.modules=[\"ir_k4_e6\"]", "space.modules: module 'ir_k4_e6': kernel must be odd"),
    ("search.targets=[1.0]", "search.names and search.targets: one target per name"),
    ("pretrain.teacher=baseline", None),  # smoke samples sandwich-style
    ("export.cascade_blends=[1.0]", "export.cascade_blends: 1.0 must be at least 0 and below 1"),
    ("data.mean=null", None),  # measured on the training images
    ("data.mean=[0.5,0.5,2]", r"data.mean: \[0.5, 0.5, 2\] must lie between 0 and 1"),
    ("data.std=[0.2,0,0.2]", r"data.std: \[0.2, 0, 0.2\] must be above 0"),
    ("data.std=[0.2,0.2]", r"data.std: \[0.2, 0.2\] needs 3 items"),
    ("search.names=ABC", "search.names: 'ABC' is not a list"),
])
def test_values_the_run_could_not_use_are_refused_at_load(override, message):
    if message is None:
        load_config("smoke", [override])
        return
    with pytest.raises(ValueError, match=message):
        load_config("smoke", [override])


def test_a_multi_resolution_meta_graph_without_twins_is_refused():
    with pytest.raises(ValueError, match="multires.epochs: the export tries the multi-resolution meta-graph's"):
        load_config("smoke", ["twins.resolutions=[]", "coadapt.epochs=0", "shared_twins.epochs=0"])
    with pytest.raises(ValueError, match="shared_twins.epochs: the phase trains the baseline at the twins' resolutions"):
        load_config("smoke", ["twins.resolutions=[]", "coadapt.epochs=0", "multires.epochs=0"])
    assert load_config("smoke", ["twins.resolutions=[]", "coadapt.epochs=0", "multires.epochs=0", "shared_twins.epochs=0"])


def test_channel_statistics_by_hand():
    from training.data import ImageSet, channel_statistics

    images = np.zeros((2, 2, 2, 3), np.uint8)
    images[0, :, :, 0] = 255  # red: half the pixels at 1, half at 0
    images[:, :, :, 1] = 51  # green: 0.2 everywhere
    mean, std = channel_statistics(ImageSet(images, np.zeros(2, np.int64), ["a"], "by hand"))
    assert mean == (0.5, 0.2, 0.0) and std == (0.5, 0.0, 0.0)


def test_every_preset_and_the_committed_runs_pass_validation():
    import json

    from training.config import PRESETS, from_dict

    for name in PRESETS:
        load_config(name)
    runs = sorted((Path(__file__).resolve().parent.parent / "docs" / "runs").glob("*/config.json"))
    assert runs
    for config in runs:
        from_dict(json.loads(config.read_text()))


def test_the_cli_refuses_a_bad_config_before_reading_any_data(tmp_path):
    """The data root does not exist: the config's error comes first, naming the key."""
    done = subprocess.run([str(BIN / "instanas-train"), "baseline", "--config", "smoke", "--set",
                           "pretrain.sampling=sparce", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pretrain.sampling: 'sparce' is not one of 'drop_path', 'sparse', 'sandwich'" in done.stderr
    assert not (tmp_path / "run").exists()
