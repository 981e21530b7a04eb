"""Run by tests/test_distributed.py under torchrun: the baseline phase on this rank's shards,
then this rank's parameters and the training images its shard of epoch 0 held."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from training import baseline
from training.config import load_config
from training.context import Context
from training.rundir import RunDir

out, data = Path(sys.argv[1]), sys.argv[2]
ctx = Context.open(RunDir(out, load_config("smoke", sys.argv[3:])), data)
baseline.run(ctx)
model = baseline.load(ctx)
batches = ctx.batches("train")
labels_seen = [y.tolist() for _, y in batches.epoch(0)]
order = torch.randperm(len(ctx.train), generator=torch.Generator().manual_seed(
    __import__("training.data", fromlist=["derive_seed"]).derive_seed(batches.seed, 0)))
indices = [order[(i * ctx.world + ctx.rank) * batches.batch_size:(i * ctx.world + ctx.rank + 1) * batches.batch_size].tolist()
           for i in range(len(batches))]
torch.save({"rank": ctx.rank, "world": ctx.world, "params": model.state_dict(), "indices": indices,
            "labels": labels_seen}, out / f"rank{ctx.rank}.pt")
