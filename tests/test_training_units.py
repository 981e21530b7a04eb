"""Reward, sampling, data loading and augmentation, config."""

from __future__ import annotations

import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from service.architecture import cheapest, mobilenet_v2
from training import data as datasets
from training.config import TwinsConfig, load_config
from training.reward import latency_reward, reward, upper_bound
from training.sampling import drop_path_policy, sparse_policy
from training.searchspace import build_search_space


def test_latency_reward_is_quadratic_between_bounds():
    z = torch.tensor([1.0, 2.0, 3.0, 0.5, 3.5, 1.5])
    r = latency_reward(z, 1.0, 3.0)
    assert r.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0, 0.75])


def test_reward_pays_only_correct_predictions():
    r = reward(torch.tensor([True, False]), torch.tensor([2.0, 2.0]), 1.0, 3.0, pos_weight=30, neg_weight=-1)
    assert r.tolist() == [30.0, -1.0]


def test_upper_bound_falls_linearly():
    assert [upper_bound(e, 5, 10.0, 2.0) for e in range(5)] == [10.0, 8.0, 6.0, 4.0, 2.0]


def test_sparse_policy_covers_every_module_count_and_the_fixed_paths():
    space = build_search_space()
    g = torch.Generator().manual_seed(0)
    policy = sparse_policy(4000, space, 0.125, g).numpy()
    assert np.array_equal(policy[0], cheapest(space)) and np.array_equal(policy[500], mobilenet_v2(space))
    counts = np.bincount(policy[1000:].sum(2).ravel(), minlength=6)
    assert (counts > 0).all()  # 0..5 modules per cell all occur
    assert np.allclose(counts / counts.sum(), 1 / 6, atol=0.02)


def test_drop_path_keeps_the_requested_share():
    space = build_search_space()
    policy = drop_path_policy(2000, space, 0.7, torch.Generator().manual_seed(0))
    assert abs(policy.float().mean().item() - 0.7) < 0.01


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


def test_loads_tar_and_folder_trees_and_checks_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANAS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "train" / "b_class").mkdir(parents=True)
    (root / "train" / "a_class").mkdir(parents=True)
    (root / "train" / "a_class" / "0.jpg").write_bytes(_jpeg((255, 0, 0)))
    (root / "train" / "b_class" / "0.jpg").write_bytes(_jpeg((0, 0, 255)))
    (root / "train" / "b_class" / "1.png").write_bytes(_jpeg((0, 0, 255)))  # a JPEG named .png still decodes
    folder = datasets.load(root, split="train")
    assert folder.classes == ["a_class", "b_class"] and folder.labels.tolist() == [0, 1, 1]
    assert folder.images.shape == (3, 32, 32, 3) and folder.images[0, 0, 0, 0] > 200

    archive = tmp_path / "arch"
    archive.mkdir()
    with tarfile.open(archive / "train.tar.gz", "w:gz") as tar:
        tar.add(root / "train", arcname="train")
    from_tar = datasets.load(archive, split="train")
    assert from_tar.classes == folder.classes and np.array_equal(from_tar.images, folder.images)
    # a second load comes from the cache and is identical
    assert np.array_equal(datasets.load(archive, split="train").images, from_tar.images)

    (archive / "SHA256SUMS").write_text("0" * 64 + "  train.tar.gz\n")
    with pytest.raises(datasets.ChecksumError):
        datasets.load(archive, split="train")
    with pytest.raises(FileNotFoundError):
        datasets.load(archive, split="validation")


def test_loads_torchvision_cifar_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    train = datasets.load(root, split="train")
    test = datasets.load(root, split="test")
    assert len(train) == 20 and len(test) == 4 and train.classes[9] == "c9"
    raw = pickle.loads((root / "test_batch").read_bytes())[b"data"][0]
    assert np.array_equal(test.images[0], raw.reshape(3, 32, 32).transpose(1, 2, 0))


def test_real_cifar_jpegs_load_with_the_documented_classes(data_root, cache_dir):
    test = datasets.load(data_root, split="test")
    assert len(test) == 8000 and test.images.shape[1:] == (32, 32, 3)
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(test.labels).tolist() == [800] * 10


def test_augmentation_keeps_shapes_and_changes_pixels():
    images = np.random.default_rng(0).integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    data = datasets.ImageSet(images, np.arange(64) % 10, [str(i) for i in range(10)], "mem")
    train = datasets.Batches(data, 32, mean=(0.5,) * 3, std=(0.25,) * 3, train=True)
    plain = datasets.Batches(data, 32, mean=(0.5,) * 3, std=(0.25,) * 3, train=False)
    (xa, _), (xp, yp) = next(iter(train)), next(iter(plain))
    assert xa.shape == xp.shape == (32, 3, 32, 32) and xa.dtype == torch.float32
    assert not torch.equal(xa, xp)
    expected = (torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(xp, expected, atol=1e-6) and yp.tolist() == list(range(10)) * 3 + [0, 1]


def test_cutout_only_in_the_first_cutout_epochs():
    """White images, no padding: only a cutout hole makes a pixel black; epoch 0 has holes, epoch 1 none."""
    data = datasets.ImageSet(np.full((16, 32, 32, 3), 255, np.uint8), np.arange(16) % 10, [str(i) for i in range(10)], "mem")
    batches = datasets.Batches(data, 16, mean=(0.0,) * 3, std=(1.0,) * 3, train=True, pad=0, cutout_epochs=1)
    [(first, _)], [(second, _)] = list(batches.epoch(0)), list(batches.epoch(1))
    assert (first == 0).any() and (second == 1).all()
    always = datasets.Batches(data, 16, mean=(0.0,) * 3, std=(1.0,) * 3, train=True, pad=0)
    assert all((x == 0).any() for e in (0, 1, 5) for x, _ in always.epoch(e))


def test_the_twins_polish_on_a_fresh_schedule():
    from training.twins import schedule

    cfg = TwinsConfig(resolutions=(16,), epochs=4, lr=0.02, warmup_epochs=0.0, polish_epochs=2, polish_lr=0.005)
    lr = schedule(cfg, steps_per_epoch=10)
    total = 60
    assert lr(0, total) == pytest.approx(0.02) and lr(39, total) < 1e-4  # the first cosine, over 4 epochs
    assert lr(40, total) == pytest.approx(0.005) and lr(50, total) == pytest.approx(0.0025)  # then a fresh one
    assert lr(59, total) < 1e-4


def test_config_presets_files_and_overrides(tmp_path):
    config = load_config("smoke", ["pretrain.epochs=3", "space.width_multiplier=0.5", "controller.channels=[4,4,8]"])
    assert config.pretrain.epochs == 3 and config.space.width_multiplier == 0.5 and config.controller.channels == (4, 4, 8)
    file = tmp_path / "c.json"
    file.write_text('{"preset": "smoke", "search": {"epochs": 7}}')
    assert load_config(str(file)).search.epochs == 7
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("smoke", ["pretrain.nope=1"])
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("no-such-preset")


def test_loads_torchvision_cifar100_pickles(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 3)):
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)),
                 b"coarse_labels": [0] * n}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)],
                                              "coarse_label_names": [f"c{i}" for i in range(20)]}))
    train = datasets.load(root, split="train")
    assert len(train) == 6 and len(train.classes) == 100 and train.labels.tolist() == list(range(6))


def test_exploration_and_annealing_by_hand():
    from training.policy import annealed, explore

    p = torch.tensor([0.0, 0.5, 1.0, 0.9])
    assert explore(p, 0.8).tolist() == pytest.approx([0.2, 0.5, 0.8, 0.74])
    assert explore(p, 1.0).tolist() == pytest.approx(p.tolist())
    assert [annealed(0.9, 1.0, s, 5) for s in range(6)] == pytest.approx([0.9, 0.925, 0.95, 0.975, 1.0, 1.0])


def test_policy_gradient_loss_by_hand():
    from training.policy import entropy, log_prob, loss

    p = torch.tensor([[[0.8, 0.25]], [[0.5, 0.5]]])  # 2 images, 1 cell, 2 modules
    action = torch.tensor([[[True, False]], [[False, True]]])
    # image 0: log 0.8 + log 0.75; image 1: log 0.5 + log 0.5
    expected_logp = [math.log(0.8) + math.log(0.75), 2 * math.log(0.5)]
    assert log_prob(p, action).tolist() == pytest.approx(expected_logp)
    h = lambda q: -q * math.log(q) - (1 - q) * math.log(1 - q)  # noqa: E731
    assert entropy(p).tolist() == pytest.approx([h(0.8) + h(0.25), 2 * h(0.5)])
    assert entropy(p, "one_sided").tolist() == pytest.approx([-0.8 * math.log(0.8) - 0.25 * math.log(0.25),
                                                              -2 * 0.5 * math.log(0.5)])
    advantage = torch.tensor([2.0, -1.0])
    got = loss(p, action, advantage, beta=0.1).item()
    want = (-(expected_logp[0] * 2.0 + expected_logp[1] * -1.0) - 0.1 * (h(0.8) + h(0.25) + 2 * h(0.5))) / 2
    assert got == pytest.approx(want)
    # the gradient raises the log-probability of an action with positive advantage
    q = torch.tensor([[[0.5]]], requires_grad=True)
    loss(q, torch.tensor([[[True]]]), torch.tensor([1.0]), beta=0.0).backward()
    assert q.grad.item() < 0


def test_paired_bootstrap_and_rank_correlation_by_hand():
    from training.report import spearman
    from training.stats import bootstrap_difference

    a = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1] * 50, bool)  # 90% right
    b = np.array([1, 0, 1, 0, 0, 1, 1, 0, 1, 1] * 50, bool)  # 60% right, wrong where a is wrong too
    result = bootstrap_difference(a, b, resamples=2000, seed=0)
    assert result["difference"] == pytest.approx(0.3)
    assert 0.25 < result["low"] < 0.3 < result["high"] < 0.35
    same = bootstrap_difference(a, a)
    assert same["difference"] == same["low"] == same["high"] == 0
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4)
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)


def test_latency_rounds_time_each_model_back_to_back_every_row_once():
    """Each model runs its slice of rows consecutively (its weights stay warm, as in a server),
    models take turns slice by slice, and every row is timed once per model."""
    from training.report import time_in_rounds

    order = []
    calls = {name: (lambda i, name=name: order.append((name, i))) for name in ("base", "A")}
    timing = time_in_rounds(calls, rows=6, rounds=2, warmup=1)
    assert set(timing) == {"base", "A"} and all(t["p99_ms"] >= t["p50_ms"] >= 0 for t in timing.values())
    # round 1: base warms on row 0 then runs rows 0-2, A the same; round 2: rows 3-5
    assert order == [("base", 0), ("base", 0), ("base", 1), ("base", 2), ("A", 0), ("A", 0), ("A", 1), ("A", 2),
                     ("base", 3), ("base", 3), ("base", 4), ("base", 5), ("A", 3), ("A", 3), ("A", 4), ("A", 5)]


def test_search_window_is_centred_on_the_target_and_reaches_the_start():
    from training.search import window

    # a start below the window's natural top: centred on the target
    assert window(1.0, 1.0, 0.1, 0.4) == pytest.approx((0.6, 1.4))
    # the controller starts far above: the top reaches over it, the middle stays on the target
    lower, upper = window(0.5, 1.0, 0.1, 0.4)
    assert upper == pytest.approx(1.2) and lower == pytest.approx(0.1) and upper > 1.0
    # a target below the cheapest architecture: a window just above the cheapest
    lower, upper = window(0.05, 0.06, 0.1, 0.4)
    assert lower == pytest.approx(0.1) and upper == pytest.approx(0.18)


def test_batch_statistics_normalise_with_the_batch_and_write_nothing_back():
    from training.batchnorm import batch_statistics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    norm = model[1]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(9.0)
    norm.num_batches_tracked.fill_(7)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        with_running = model(x)
        with batch_statistics(model):
            inside = model(x)
        after = model(x)
    h = model[0](x).detach()
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    assert torch.allclose(inside, expected, atol=1e-5)
    assert not torch.allclose(inside, with_running, atol=1e-2)
    assert torch.equal(after, with_running)  # nothing written back
    assert not norm.training and norm.momentum == 0.1 and int(norm.num_batches_tracked) == 7
    assert torch.equal(norm.running_mean, torch.full((4,), 5.0)) and torch.equal(norm.running_var, torch.full((4,), 9.0))


def test_the_cifar10_download_unpacks_a_checked_archive_offline(tmp_path):
    """training/download.py against a file:// URL: the archive is checked (a wrong MD5 unpacks
    nothing), unpacked into cifar-10-batches-py, and training/data.py reads it."""
    import hashlib
    import tarfile

    from training import download

    root = tmp_path / "src" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8),
                                                b"labels": [3, 5]}))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="MD5"):
        download.download(tmp_path / "data", archive.as_uri(), "0" * 32)
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()
    assert download.main([str(tmp_path / "data"), "--url", archive.as_uri(), "--md5", "0" * 32]) == 1
    folder = download.download(tmp_path / "data", archive.as_uri(), md5)
    assert folder == tmp_path / "data" / "cifar-10-batches-py"
    train = datasets.load(folder, split="train")
    assert len(train) == 10 and train.classes[5] == "c5" and set(train.labels.tolist()) == {3, 5}
    assert download.download(tmp_path / "data", "file:///nowhere", md5) == folder  # there already: kept
