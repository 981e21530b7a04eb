"""Batch-norm re-estimation: running statistics recomputed for the paths that will be served.

A module's batch norms saw, during training, a mixture of the inputs every sampled path
gave it; served paths are fewer. Before a path (or a set of operating points) is judged,
its statistics are recomputed as exact averages over training images run through it.
"""

from __future__ import annotations

from contextlib import contextmanager

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


@contextmanager
def batch_statistics(model: nn.Module):
    """Inside the block every BatchNorm normalises with the statistics of the batch it sees and
    writes nothing back: train mode with momentum 0, running statistics and counters restored.

    In a sparse forward each module sees only the rows that selected it, so a sampled path is
    judged with statistics of inputs like its own, not those of the mixture pre-training left."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield model
    finally:
        for m, (training, momentum, tracked) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
