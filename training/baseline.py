"""Phase `baseline`: a standalone MobileNetV2 of the meta-graph's width, trained to convergence.

It is the meta-graph's module 0 in every cell with the same stem, head, data and
augmentation, so it is both the fair baseline the frontier is judged against and the
warm start of the meta-graph. Every epoch logs validation top-1 and wall-clock (the
learning curve that shows it converged); the test split is read once, at the end.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.loop import converged, train
from training.metagraph import MetaGraph
from training.optim import cosine_lr, decay_groups, sgd


def _path(space) -> np.ndarray:
    return np.ones((space.num_cells, 1), bool)


def load(ctx: Context) -> MetaGraph:
    """The finished baseline (a MetaGraph over `ctx.baseline_space`), in eval mode."""
    model = ctx.new_metagraph(ctx.baseline_space)
    model.load_state_dict(ctx.run.require("baseline")["model"])
    return model.eval()


def teacher(ctx: Context):
    """The finished baseline, frozen, as a teacher: images -> logits, without gradients."""
    model = load(ctx).requires_grad_(False)
    path = fixed_policy(_path(ctx.baseline_space))

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return model.forward_selected(x, path(x))

    return predict


def run(ctx: Context) -> dict:
    cfg = ctx.config.baseline
    space = ctx.baseline_space
    model = ctx.new_metagraph(space)
    optimizer = sgd(decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    warmup = int(cfg.warmup_epochs * len(ctx.batches("train")))
    path = _path(space)

    def step(x, y, _generator, _step, forward):
        [logits] = forward(x, [fixed_policy(path)(x)])
        return F.cross_entropy(logits, y), logits

    def validate() -> dict:
        return {"val_top1": evaluate(model, ctx.batches("val"), fixed_policy(path))["top1"]}

    state = train(ctx, "baseline", model, optimizer, epochs=cfg.epochs, step=step, validate=validate,
                  lr=lambda s, total: cosine_lr(cfg.lr, s, total, warmup), seed=5000)
    if "figures" in state:
        return state
    test = evaluate(model, ctx.batches("test"), fixed_policy(path))
    gain = converged(state["curve"])
    figures = {"test_top1": test["top1"], "test_images": test["images"], "val_top1": state["curve"][-1]["val_top1"],
               "gain_last_10pct_epochs": gain, "elapsed_s": state["elapsed"]}
    ctx.run.log("baseline", **figures)
    print("baseline: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
    state["figures"] = figures
    ctx.run.save("baseline", state)
    return state
