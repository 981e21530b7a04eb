"""Accuracy of the meta-graph under a policy, on held-out data."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from training.data import Batches
from training.metagraph import MetaGraph

PolicyFn = Callable[[torch.Tensor], torch.Tensor]


def fixed_policy(matrix: np.ndarray) -> PolicyFn:
    """The same (cells, modules) architecture for every image."""
    m = torch.from_numpy(np.asarray(matrix, bool))
    return lambda x: m.to(x.device).expand(x.shape[0], *m.shape)


@torch.no_grad()
def evaluate(metagraph: MetaGraph, batches: Batches, policy_fn: PolicyFn) -> dict:
    """top-1 accuracy and `usage`, the (cells, modules) share of images that ran each module.

    The mean cost of what ran under any per-module table is then `(usage * table).sum()`.
    """
    was_training = metagraph.training
    metagraph.eval()
    correct, total = 0, 0
    usage = torch.zeros(metagraph.space.num_cells, metagraph.space.num_modules)
    param = next(metagraph.parameters())
    fmt = torch.channels_last if param.device.type == "cpu" else torch.contiguous_format
    for x, y in tqdm(batches, desc="evaluate", unit="batch", leave=False, mininterval=5):
        x, y = x.to(param.device).contiguous(memory_format=fmt), y.to(param.device)
        policy = policy_fn(x)
        correct += (metagraph.forward_selected(x, policy).argmax(1) == y).sum().item()
        total += len(y)
        usage += metagraph.executed(policy).sum(0).cpu()
    metagraph.train(was_training)
    usage = (usage / max(total, 1)).numpy()
    return {"top1": correct / max(total, 1), "images": total, "modules": float(usage.sum()), "usage": usage}
