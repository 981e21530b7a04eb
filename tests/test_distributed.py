"""torchrun with 2 processes (gloo, CPU) on the smoke preset: disjoint shards, one model."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import torch

from tests.conftest import BIN, ROOT, free_port
from training.data import Batches, ImageSet


def test_ranks_read_disjoint_shards_of_every_epoch():
    data = ImageSet(np.zeros((100, 4, 4, 3), np.uint8), np.arange(100), ["a"], "none")
    seen = []
    for rank in (0, 1):
        b = Batches(data, 10, mean=(0, 0, 0), std=(1, 1, 1), train=False, rank=rank, world=2)
        b.train = True  # shuffle, no augmentation needed to see the order
        b.pad = b.cutout = 0
        seen.append(torch.cat([y for _, y in b.epoch(3)]).tolist())
    assert len(seen[0]) == len(seen[1]) == 50
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(100))


def test_torchrun_two_processes_train_one_model(data_root, cache_dir, tmp_path):
    args = ["data.train_limit=256", "data.val_images=64", "data.test_limit=64", "baseline.epochs=2", "threads=1"]
    done = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), str(data_root), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["world"], r1["world"], r0["rank"], r1["rank"]) == (2, 2, 0, 1)
    shard0, shard1 = ({i for batch in r["indices"] for i in batch} for r in (r0, r1))
    assert shard0 and shard1 and not shard0 & shard1  # disjoint shards of the same epoch
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])  # one model
    saved = torch.load(tmp_path / "baseline.pt", weights_only=False)
    assert saved["done"] and all(torch.equal(saved["model"][k], r0["params"][k]) for k in r0["params"])
    assert saved["steps_per_epoch"] == 2  # 256 images, batches of 64, two ranks
