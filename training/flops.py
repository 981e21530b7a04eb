"""Analytic cost of a module at batch 1: multiply-adds x 2 of its convolutions and linears."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def count(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, int]:
    """(MFLOPs per image, parameter count) for one input of `input_shape` (C, H, W)."""
    flops = 0

    def conv_hook(m: nn.Conv2d, _inputs, output):
        nonlocal flops
        kh, kw = m.kernel_size
        flops += 2 * output.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inputs, output):
        nonlocal flops
        flops += 2 * output.numel() * m.in_features

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    param = next(module.parameters())
    try:
        module(torch.zeros(1, *input_shape, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    return flops / 1e6, sum(p.numel() for p in module.parameters())
