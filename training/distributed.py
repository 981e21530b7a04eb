"""Training on several processes with torchrun: the process group, and DistributedDataParallel.

`torchrun --nproc_per_node N -m training.cli <phase> ...` runs the same command on N
processes (gloo on CPU, NCCL on GPUs, one GPU a process). Each rank reads its own shard of
every epoch (`Batches(rank, world)`), gradients are averaged by DDP, rank 0 alone writes
checkpoints and logs. Without torchrun nothing here is used.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (so that all raise together, none waits forever)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Selected(nn.Module):
    """One forward call for all the passes of a step: `(x, [policy, ...]) -> [logits, ...]`,
    each with `forward_selected`, so DDP sees one forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, policies: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.model.forward_selected(x, policy) for policy in policies]


def wrap(model: nn.Module) -> nn.Module:
    """`Selected(model)`, inside DistributedDataParallel when the process group is up. Where
    cells hold several modules, paths leave some unused, so DDP looks for them in each step."""
    net = Selected(model)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return nn.parallel.DistributedDataParallel(net, find_unused_parameters=model.space.num_modules > 1)
    return net
