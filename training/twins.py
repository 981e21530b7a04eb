"""Phase `twins`: the static MobileNetV2 (the baseline) fine-tuned at each lower input resolution.

Every convolution's cost scales with height x width, so the baseline at 16x16 costs about a
third of it at 32x32; fine-tuned there, it answers most images alone, and a cascade sends the
rest on to the full resolution (training/cascade.py). Each resolution gets its own copy of the
baseline's weights, batch-norm included: once exported, every resolution's graphs are separate
anyway (batch norm folds into the convolutions), so sharing weights would save nothing served.
All the copies train in one loop on the same augmented batches, each on the batch average-pooled
to its resolution, with labels and the finished 32x32 baseline as teacher (weight `distill`).
After `epochs`, `polish_epochs` more go on without cutout from a fresh, lower cosine schedule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training import baseline
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.loop import train
from training.optim import cosine_lr, decay_groups, sgd
from training.pretrain import distillation
from training.resolution import AtResolution, check


class Twins(nn.Module):
    """One baseline copy per resolution; `forward_selected(x, policy)` -> [logits at each resolution]."""

    def __init__(self, models: dict[int, nn.Module]):
        super().__init__()
        self.resolutions = tuple(models)
        self.twins = nn.ModuleList(AtResolution(model, r) for r, model in models.items())
        self.space = self.twins[0].space

    def forward_selected(self, x: torch.Tensor, policy: torch.Tensor) -> list[torch.Tensor]:
        return [twin.forward_selected(x, policy) for twin in self.twins]

    def at(self, resolution: int) -> AtResolution:
        return self.twins[self.resolutions.index(resolution)]


def _new(ctx: Context) -> Twins:
    return Twins({r: ctx.new_metagraph(ctx.baseline_space) for r in ctx.config.twins.resolutions})


def load(ctx: Context) -> dict[int, AtResolution]:
    """The finished twins in eval mode, by resolution (empty when the run has none)."""
    if not ctx.config.twins.resolutions:
        return {}
    model = _new(ctx)
    model.load_state_dict(ctx.run.require("twins")["model"])
    return {r: model.at(r).eval() for r in model.resolutions}


def schedule(cfg, steps_per_epoch: int):
    """The learning rate of step s of `total`: a cosine from `lr` (after its warm-up) over the
    first `epochs`, then a fresh one from `polish_lr` over the `polish_epochs`."""
    main = cfg.epochs * steps_per_epoch

    def lr(s: int, total: int) -> float:
        if s < main:
            return cosine_lr(cfg.lr, s, main, int(cfg.warmup_epochs * steps_per_epoch))
        return cosine_lr(cfg.polish_lr, s - main, total - main)

    return lr


def run(ctx: Context) -> dict | None:
    cfg = ctx.config.twins
    if not cfg.resolutions:
        return None
    for r in cfg.resolutions:
        check(r, ctx.space.input_size, ctx.space.input_size // ctx.space.cells[-1].output_size)
    model = _new(ctx)
    if not ctx.run.checkpoint("twins").exists():
        start = baseline.load(ctx).state_dict()
        for twin in model.twins:
            twin.model.load_state_dict(start)
    optimizer = sgd(decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    teacher = baseline.teacher(ctx)
    path = np.ones((ctx.baseline_space.num_cells, 1), bool)

    def step(x, y, _generator, _step, forward):
        [outputs] = forward(x, [fixed_policy(path)(x)])
        target = teacher(x)
        loss = sum((1 - cfg.distill) * F.cross_entropy(logits, y) + cfg.distill * distillation(logits, target)
                   for logits in outputs)
        return loss, outputs[0]

    def validate() -> dict:
        return {f"val_top1_{r}": evaluate(model.at(r), ctx.batches("val"), fixed_policy(path))["top1"]
                for r in model.resolutions}

    state = train(ctx, "twins", model, optimizer, epochs=cfg.epochs + cfg.polish_epochs, step=step,
                  validate=validate, lr=schedule(cfg, len(ctx.batches("train"))), seed=7000, cutout_epochs=cfg.epochs)
    return state
