"""Phase `shared_twins`: the baseline trained at its twins' resolutions and its input size at once,
one set of convolutions for every resolution and batch norms of each resolution's own
(training/switchable.py), as phase `multires` trains the meta-graph.

Phase `twins` gives each lower resolution a copy of the baseline of its own. This phase asks
whether one network shared across resolutions does better at either end: a static network whose
16x16 pass is a better first stage, or whose 32x32 pass is a better last stage, than the
separate copies. Every step runs the batch at every resolution (the input average-pooled to it,
training/resolution.py), with the labels and the finished baseline as teacher (weight `distill`);
it starts from the baseline's weights, every resolution's batch norms from its one set.

The export tries the lower resolutions' networks as cascade first stages beside the twin
(`mobilenet_v2-shared@16`) and the full resolution's as a last stage beside the baseline
(`mobilenet_v2-shared`) where it beats the baseline on validation (training/cascade_points.py).
The phase's end figures (`figures`) put each resolution's validation top-1 beside the separate
network's: the twin at a lower resolution, the baseline at the input size.
"""

from __future__ import annotations

import numpy as np
from torch.nn import functional as F

from training import baseline, twins
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.loop import train
from training.metagraph import MetaGraph
from training.multires import MultiResolution
from training.optim import cosine_lr, decay_groups, sgd
from training.pretrain import distillation


def resolutions(ctx: Context) -> tuple[int, ...]:
    """The twins' resolutions, then the input size."""
    return (*sorted(set(ctx.config.twins.resolutions)), ctx.space.input_size)


def enabled(ctx: Context) -> bool:
    return bool(ctx.config.shared_twins.epochs and ctx.config.twins.resolutions)


def _new(ctx: Context) -> MultiResolution:
    network = ctx.new_metagraph(ctx.baseline_space)
    if not ctx.run.checkpoint("shared_twins").exists():
        network.load_state_dict(baseline.load(ctx).state_dict())
    return MultiResolution(network, resolutions(ctx))


def networks(ctx: Context) -> dict[int, MetaGraph]:
    """The finished phase's network at each resolution, a plain one (eval mode, on the CPU) with that
    resolution's batch norms; empty when the run has no such phase."""
    if not enabled(ctx):
        return {}
    model = MultiResolution(ctx.new_metagraph(ctx.baseline_space), resolutions(ctx))
    model.load_state_dict(ctx.run.require("shared_twins")["model"])
    return {r: model.plain(r, ctx.baseline_space_at(r)) for r in model.resolutions}


def figures(ctx: Context, model: MultiResolution) -> dict:
    """Validation top-1 at each resolution: `val_top1_<r>_shared` (this phase's network) and
    `val_top1_<r>_separate` (the twin at a lower resolution, the baseline at the input size)."""
    path = fixed_policy(np.ones((ctx.baseline_space.num_cells, 1), bool))
    separate = {**twins.load(ctx), ctx.space.input_size: baseline.load(ctx)}
    out = {}
    for r in model.resolutions:
        out[f"val_top1_{r}_shared"] = evaluate(model.at(r), ctx.batches("val"), path)["top1"]
        out[f"val_top1_{r}_separate"] = evaluate(separate[r], ctx.batches("val"), path)["top1"]
    return out


def run(ctx: Context) -> dict | None:
    cfg = ctx.config.shared_twins
    if not enabled(ctx):
        return None
    model = _new(ctx)
    optimizer = sgd(decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    teacher = baseline.teacher(ctx)
    path = fixed_policy(np.ones((ctx.baseline_space.num_cells, 1), bool))
    warmup = int(cfg.warmup_epochs * len(ctx.batches("train")))

    def step(x, y, _generator, _step, forward):
        [outputs] = forward(x, [path(x)])
        target = teacher(x)
        loss = sum((1 - cfg.distill) * F.cross_entropy(logits, y) + cfg.distill * distillation(logits, target)
                   for logits in outputs)
        return loss, outputs[-1]

    def validate() -> dict:
        return {f"val_top1_{r}": evaluate(model.at(r), ctx.batches("val"), path)["top1"] for r in model.resolutions}

    state = train(ctx, "shared_twins", model, optimizer, epochs=cfg.epochs, step=step, validate=validate,
                  lr=lambda s, total: cosine_lr(cfg.lr, s, total, warmup), seed=9000)
    if "figures" in state or not ctx.run.main:
        return state
    state["figures"] = figures(ctx, model)
    ctx.run.log("shared_twins", **state["figures"])
    print("shared_twins: " + ", ".join(f"{k}={v:.4g}" for k, v in state["figures"].items()), flush=True)
    ctx.run.save("shared_twins", state)
    return state

