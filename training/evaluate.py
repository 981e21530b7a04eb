"""Accuracy of the meta-graph under a policy, on held-out data."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from service import architecture
from service.architecture import CostTable
from service.manifest import GREEDY_THRESHOLD
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
    codes: dict[str, int] = {}
    param = next(metagraph.parameters())
    fmt = torch.channels_last if param.device.type == "cpu" else torch.contiguous_format
    for x, y in tqdm(batches, desc="evaluate", unit="batch", leave=False, mininterval=5):
        x, y = x.to(param.device).contiguous(memory_format=fmt), y.to(param.device)
        policy = policy_fn(x)
        correct += (metagraph.forward_selected(x, policy).argmax(1) == y).sum().item()
        total += len(y)
        executed = metagraph.executed(policy).cpu()
        usage += executed.sum(0)
        for matrix in executed.numpy():
            code = architecture.encode(matrix)
            codes[code] = codes.get(code, 0) + 1
    metagraph.train(was_training)
    usage = (usage / max(total, 1)).numpy()
    return {"top1": correct / max(total, 1), "images": total, "modules": float(usage.sum()), "usage": usage,
            "architectures": len(codes), "codes": codes}


def greedy(controller, threshold: float = GREEDY_THRESHOLD) -> PolicyFn:
    """The controller's served policy: a module runs where its probability is at least the threshold."""
    return lambda x: controller(x) >= threshold


@torch.no_grad()
def evaluate_controller(ctx, metagraph: MetaGraph, controller, costs: CostTable, split: str = "val") -> dict:
    """Accuracy on `split` with the controller's greedy policies, and the mean cost of what ran
    (controller included), from the service's cost model."""
    was_training = controller.training
    controller.eval()
    result = evaluate(metagraph, ctx.batches(split), greedy(controller))
    controller.train(was_training)
    usage = result["usage"]
    fixed_ms, fixed_mflops = costs.latency_ms(np.zeros((1, *usage.shape)), "controller")[0], \
        costs.mflops(np.zeros((1, *usage.shape)), "controller")[0]
    return {"top1": result["top1"], "images": result["images"], "modules": result["modules"],
            "architectures": result["architectures"],
            "latency_ms": float(fixed_ms + (usage * costs.block_ms).sum()),
            "mflops": float(fixed_mflops + (usage * costs.block_mflops).sum())}
