"""Batch-norm re-estimation: running statistics recomputed for the paths that will be served.

A module's batch norms saw, during training, a mixture of the inputs every sampled path
gave it; served paths are fewer. Before a path (or a set of operating points) is judged,
its statistics are recomputed as exact averages over training images run through it.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def reestimate(model: nn.Module, batches, forward, max_images: int) -> int:
    """Reset every BatchNorm's running statistics and recompute them as cumulative averages
    over up to `max_images` images of `batches`, each batch run with `forward(x)`. Returns the
    number of images used; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    seen = 0
    for x, _ in batches:
        if seen >= max_images:
            break
        forward(x[: max_images - seen])
        seen += min(len(x), max_images - seen)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return seen
