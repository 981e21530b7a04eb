"""Optimizers and learning-rate schedules shared by every training phase."""

from __future__ import annotations

import math

import torch
from torch import nn


def sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum, as the paper trains the meta-graph."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on convolution and linear weights only: decaying
    batch-norm scales and biases shrinks activations without regularising anything."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(base: float, step: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * min(step - warmup, total) / max(total - warmup, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
