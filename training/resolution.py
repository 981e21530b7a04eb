"""Input resolution: an image at a lower resolution is the full-size input, average-pooled.

Every network of a run reads the same prepared input (`space.input_size` square, normalised);
a network at resolution r first averages each (input_size / r)-square of pixels. Pooling is
linear, so pooling the normalised image equals normalising the pooled one, and the pooling is
part of the exported graph: the service prepares an image once, whatever resolution runs on it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def check(resolution: int, input_size: int, total_stride: int) -> None:
    """A resolution a network of this input size can run at, or ValueError saying why not."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution {resolution!r} is not a positive integer")
    if resolution > input_size or input_size % resolution:
        raise ValueError(f"resolution {resolution} does not divide the input size {input_size}: a lower "
                         "resolution is the input average-pooled by a whole factor")
    if resolution < total_stride:
        raise ValueError(f"resolution {resolution} is below the network's total stride {total_stride}: "
                         "its last feature map would be empty")


def downsample(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """`x` (N, C, S, S) at `resolution`: the mean of each (S / resolution)-square; `x` itself at S."""
    factor = x.shape[-1] // resolution
    return x if factor == 1 else F.avg_pool2d(x, factor)


class AtResolution(nn.Module):
    """`model` run on its input average-pooled to `resolution` (`forward` and `forward_selected`)."""

    def __init__(self, model: nn.Module, resolution: int):
        super().__init__()
        self.model = model
        self.resolution = resolution

    @property
    def space(self):
        return self.model.space

    def executed(self, policy: torch.Tensor) -> torch.Tensor:
        return self.model.executed(policy)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.model(downsample(x, self.resolution), *args)

    def forward_selected(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        return self.model.forward_selected(downsample(x, self.resolution), policy)
