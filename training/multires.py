"""Phase `multires`: the fine-tuned meta-graph trained at several input resolutions at once.

Resolution joins the architecture: an architecture of the search space at resolution r reads the
input average-pooled to r x r (training/resolution.py), and costs about (r / input size)^2 of
it at full size. The meta-graph's convolutions are shared by every resolution, each resolution
has batch norms of its own (training/switchable.py). Every step is a sandwich over resolutions
and paths: the batch's rows take the MobileNetV2 path, the cheapest path or random sparse paths
(`sampling.sandwich_policy`), and each row runs its path at every resolution, with the labels and
the finished full-resolution baseline as teacher (weight `distill`). It starts from the `finetune` phase's
meta-graph, every resolution's batch norms from its one set.

The export takes architectures of this meta-graph at the lower resolutions as cascade first
stages (training/cascade_points.py): each, with its resolution's batch norms re-estimated on the
architecture alone, is a static network of the bundle. The phase's end figures (`figures`:
`val_top1_<path>_<resolution>_own` and `_shared`) say, on the validation split, whether a
resolution's own batch norms beat the full resolution's re-estimated there: the choice of
switchable batch norms rests on them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.architecture import cheapest, mobilenet_v2
from training import baseline, switchable
from training.batchnorm import reestimate
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.loop import train
from training.metagraph import MetaGraph
from training.optim import cosine_lr, decay_groups, sgd
from training.pretrain import distillation
from training.resolution import AtResolution, check, downsample
from training.sampling import sandwich_policy


class ResolutionView(nn.Module):
    """A `MultiResolution` model seen at one of its resolutions: its batch norms, the input pooled."""

    def __init__(self, parent: "MultiResolution", resolution: int):
        super().__init__()
        self.parent = parent
        self.resolution = resolution
        self.index = parent.resolutions.index(resolution)
        self.train(parent.training)  # a view of an eval-mode model is in eval mode (evaluate restores it)

    @property
    def space(self):
        return self.parent.space

    def executed(self, policy: torch.Tensor) -> torch.Tensor:
        return self.parent.metagraph.executed(policy)

    def forward_selected(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        with switchable.use(self.parent.metagraph, self.index):
            return self.parent.metagraph.forward_selected(downsample(x, self.resolution), policy)


class MultiResolution(nn.Module):
    """The meta-graph with switchable batch norms, one copy per resolution (lowest first);
    `forward_selected(x, policy)` -> [logits at each resolution]."""

    def __init__(self, metagraph: MetaGraph, resolutions: tuple[int, ...]):
        super().__init__()
        self.resolutions = tuple(resolutions)
        self.space = metagraph.space
        self.metagraph = switchable.switchable(metagraph, len(self.resolutions))

    def at(self, resolution: int) -> "ResolutionView":
        return ResolutionView(self, resolution)

    def forward_selected(self, x: torch.Tensor, policy: torch.Tensor) -> list[torch.Tensor]:
        return [self.at(r).forward_selected(x, policy) for r in self.resolutions]

    def plain(self, resolution: int, space) -> MetaGraph:
        """A plain meta-graph over `space` (the search space at `resolution`) with this model's
        weights and that resolution's batch norms, in eval mode, on the CPU."""
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: draw nothing from the run's stream
            model = MetaGraph(space)
        model.load_state_dict(switchable.collapse(self.metagraph.state_dict(), self.resolutions.index(resolution)))
        return model.eval()


def resolutions(ctx: Context) -> tuple[int, ...]:
    """The resolutions the phase trains at: `multires.resolutions`, then the input size."""
    return (*sorted(set(ctx.config.multires.resolutions)), ctx.space.input_size)


def _new(ctx: Context) -> MultiResolution:
    metagraph = ctx.new_metagraph()
    if not ctx.run.checkpoint("multires").exists():
        metagraph.load_state_dict(ctx.run.require("finetune")["model"])
    return MultiResolution(metagraph, resolutions(ctx))


def load(ctx: Context) -> MultiResolution | None:
    """The finished phase's model in eval mode (None when the run trains no lower resolution)."""
    if not ctx.config.multires.resolutions or not ctx.config.multires.epochs:
        return None
    model = MultiResolution(ctx.new_metagraph(), resolutions(ctx))
    model.load_state_dict(ctx.run.require("multires")["model"])
    return model.eval()


def reestimated(ctx: Context, model: MetaGraph, resolution: int, matrix: np.ndarray) -> MetaGraph:
    """`model` (a plain meta-graph at `resolution`) with its batch-norm statistics recomputed on
    training images run through the architecture `matrix` alone: the network a cascade serves."""
    path = fixed_policy(matrix)
    reestimate(model, ctx.batches("train", seed=8000),
               lambda x: model.forward_selected(downsample(x, resolution), path(x)), ctx.config.multires.bn_images)
    return model


def batch_norm_figures(ctx: Context, model: MultiResolution) -> dict:
    """On validation, the MobileNetV2 and cheapest paths at each lower resolution with (a) that
    resolution's own batch norms and (b) the full resolution's, both re-estimated on the path at
    that resolution: whether switchable batch norms pay."""
    full = ctx.space.input_size
    figures = {}
    for r in model.resolutions[:-1]:
        space = ctx.space_at(r)
        for name, matrix in (("mobilenet_v2", mobilenet_v2(ctx.space)), ("cheapest", cheapest(ctx.space))):
            for which, own in (("own", r), ("shared", full)):
                net = reestimated(ctx, model.plain(own, space), r, matrix)
                figures[f"val_top1_{name}_{r}_{which}"] = evaluate(AtResolution(net, r), ctx.batches("val"),
                                                                   fixed_policy(matrix))["top1"]
    return figures


def run(ctx: Context) -> dict | None:
    cfg = ctx.config.multires
    if not cfg.resolutions or not cfg.epochs:
        return None
    for r in cfg.resolutions:
        check(r, ctx.space.input_size, ctx.space.total_stride)
    model = _new(ctx)
    optimizer = sgd(decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    teacher = baseline.teacher(ctx)
    space = ctx.space
    warmup = int(cfg.warmup_epochs * len(ctx.batches("train")))

    def step(x, y, generator, _step, forward):
        policy = sandwich_policy(len(y), space, generator).to(x.device)
        [outputs] = forward(x, [policy])
        target = teacher(x)
        loss = sum((1 - cfg.distill) * F.cross_entropy(logits, y) + cfg.distill * distillation(logits, target)
                   for logits in outputs)
        return loss, outputs[-1]

    def validate() -> dict:
        return {f"val_top1_{name}_{r}": evaluate(model.at(r), ctx.batches("val"), fixed_policy(matrix))["top1"]
                for r in model.resolutions
                for name, matrix in (("mobilenet_v2", mobilenet_v2(space)), ("cheapest", cheapest(space)))}

    state = train(ctx, "multires", model, optimizer, epochs=cfg.epochs, step=step, validate=validate,
                  lr=lambda s, total: cosine_lr(cfg.lr, s, total, warmup), seed=8000)
    if "figures" in state or not ctx.run.main:
        return state
    figures = batch_norm_figures(ctx, model)
    ctx.run.log("multires", **figures)
    print("multires: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
    state["figures"] = figures
    ctx.run.save("multires", state)
    return state
