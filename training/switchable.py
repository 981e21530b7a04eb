"""Switchable batch norm: one network's convolutions shared across input resolutions, each
resolution with batch norms of its own (statistics and affine weights), as slimmable and
multi-resolution networks train them.

The statistics of a feature map depend on the resolution it was computed at (a 16x16 image's
activations are smoother than a 32x32 one's), so a batch norm shared by both normalises neither
well. `switchable(model, n)` replaces every BatchNorm2d of `model` with n copies of it, `use(model, i)`
selects copy i everywhere, and `collapse(state, i)` turns the model's state into a plain one
whose batch norms are copy i: exported at one resolution, the graphs are a plain network's.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager

import torch
from torch import nn


class SwitchableBatchNorm2d(nn.Module):
    """`n` copies of a BatchNorm2d; the one at `active` normalises."""

    def __init__(self, norm: nn.BatchNorm2d, n: int):
        super().__init__()
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(n))
        self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[self.active](x)


def switchable(model: nn.Module, n: int) -> nn.Module:
    """`model` (in place) with every BatchNorm2d replaced by `n` copies of itself."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, SwitchableBatchNorm2d(child, n))
        else:
            switchable(child, n)
    return model


def select(model: nn.Module, index: int) -> None:
    """Every switchable batch norm of `model` normalises with its copy `index` from now on."""
    for m in model.modules():
        if isinstance(m, SwitchableBatchNorm2d):
            if not 0 <= index < len(m.norms):
                raise IndexError(f"batch-norm copy {index} of {len(m.norms)}")
            m.active = index


@contextmanager
def use(model: nn.Module, index: int):
    """Inside the block, `model`'s switchable batch norms use copy `index`; the one before after."""
    before = [m.active for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    select(model, index)
    try:
        yield model
    finally:
        for m, active in zip((m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)), before):
            m.active = active


_COPY = re.compile(r"\.norms\.(\d+)\.")


def collapse(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The state of the plain model (one batch norm each) whose batch norms are copy `index` of `state`'s."""
    out = {}
    for key, value in state.items():
        found = _COPY.search(key)
        if found is None:
            out[key] = value
        elif int(found.group(1)) == index:
            out[key[: found.start()] + "." + key[found.end():]] = value
    return out
