"""Phase `coadapt`: a cascade's last stage fine-tuned on the images its first stage escalates.

With the routing fixed (the lowest-resolution twin, frozen, and its confidence), a copy of the
baseline at full resolution is fine-tuned on the `share` of every training batch the twin is
least sure about: the kind of image the last stage answers once served. Its control, a second
copy fine-tuned on as many images of each batch drawn at random (the routes shuffled), trains
beside it on the same batches, the same number of steps and images, so that what the routing
adds is measured apart from what more training adds. Both start from the finished baseline,
which teaches them (weight `distill`). The export fits cascades on either (training/cascade_points.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training import baseline, cascade, twins
from training.context import Context
from training.evaluate import fixed_policy
from training.loop import train
from training.optim import cosine_lr, decay_groups, sgd
from training.pretrain import distillation

COPIES = ("coadapted", "shuffled")  # fine-tuned on the routed images; on random ones (the control)


class Copies(nn.Module):
    """The two copies of the baseline; `forward_selected(x, policy)` runs the first half of the rows
    through the co-adapted copy and the second half through the control."""

    def __init__(self, coadapted: nn.Module, shuffled: nn.Module):
        super().__init__()
        self.copies = nn.ModuleList([coadapted, shuffled])
        self.space = coadapted.space

    def forward_selected(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        half = len(x) // 2
        return torch.cat([self.copies[0].forward_selected(x[:half], policy[:half]),
                          self.copies[1].forward_selected(x[half:], policy[half:])])

    def by_name(self) -> dict[str, nn.Module]:
        return dict(zip(COPIES, self.copies))


def _new(ctx: Context) -> Copies:
    return Copies(ctx.new_metagraph(ctx.baseline_space), ctx.new_metagraph(ctx.baseline_space))


def load(ctx: Context) -> dict[str, nn.Module]:
    """The finished copies in eval mode, by name (`COPIES`); empty when the run has none."""
    if not ctx.config.coadapt.epochs or not ctx.run.checkpoint("coadapt").exists():
        return {}
    model = _new(ctx)
    model.load_state_dict(ctx.run.require("coadapt")["model"])
    return {name: copy.eval() for name, copy in model.by_name().items()}


def first_stage(ctx: Context) -> nn.Module:
    """The cascades' first stage: the lowest-resolution twin, frozen."""
    lows = twins.load(ctx)
    return lows[min(lows)].requires_grad_(False)


def routed(sure: np.ndarray, share: float) -> np.ndarray:
    """The indices of the `share` of rows least sure (the lowest confidences; ties by position)."""
    count = max(1, int(round(share * len(sure))))
    return np.argsort(np.asarray(sure, np.float64), kind="stable")[:count]


@torch.no_grad()
def predict(model: nn.Module, batches) -> np.ndarray:
    """The logits of a network over the baseline's space (its one path) on every image of `batches`, in eval mode."""
    model.eval()
    path = fixed_policy(np.ones((model.space.num_cells, 1), bool))
    return np.concatenate([model.forward_selected(x, path(x)).cpu().numpy() for x, _ in batches])


def run(ctx: Context) -> dict | None:
    cfg = ctx.config.coadapt
    if not cfg.epochs:
        return None
    model = _new(ctx)
    if not ctx.run.checkpoint("coadapt").exists():
        start = baseline.load(ctx).state_dict()
        for copy in model.copies:
            copy.load_state_dict(start)
    optimizer = sgd(decay_groups(model, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    teacher = baseline.teacher(ctx)
    first = first_stage(ctx)
    path = np.ones((ctx.baseline_space.num_cells, 1), bool)
    labels = np.concatenate([y.numpy() for _, y in ctx.batches("val")])
    val_routed = routed(cascade.confidence(cfg.confidence, predict(first, ctx.batches("val"))), cfg.share)
    right = predict(baseline.load(ctx), ctx.batches("val")).argmax(1) == labels
    print(f"coadapt: the baseline's validation top-1 {right.mean():.4f}, {right[val_routed].mean():.4f} on the "
          f"{cfg.share:g} the first stage is least sure about", flush=True)
    if not ctx.run.checkpoint("coadapt").exists():
        ctx.run.log("coadapt", val_top1_baseline=float(right.mean()), val_routed_top1_baseline=float(right[val_routed].mean()))

    def step(x, y, generator, _step, forward):
        with torch.no_grad():
            sure = cascade.confidence(cfg.confidence, first.forward_selected(x, fixed_policy(path)(x)).cpu().numpy())
        hard = torch.from_numpy(routed(sure, cfg.share)).to(x.device)
        drawn = torch.randperm(len(y), generator=generator)[:len(hard)].to(x.device)
        rows = torch.cat([hard, drawn])
        [logits] = forward(x[rows], [fixed_policy(path)(x[rows])])
        # each copy's mean loss over its own rows (the two halves are the same size)
        loss = 2 * ((1 - cfg.distill) * F.cross_entropy(logits, y[rows])
                    + cfg.distill * distillation(logits, teacher(x[rows])))
        return loss, None

    def validate() -> dict:
        figures = {}
        for name, copy in model.by_name().items():
            right = predict(copy, ctx.batches("val")).argmax(1) == labels
            figures[f"val_top1_{name}"] = float(right.mean())
            figures[f"val_routed_top1_{name}"] = float(right[val_routed].mean())
        return figures

    warmup = int(cfg.warmup_epochs * len(ctx.batches("train")))
    return train(ctx, "coadapt", model, optimizer, epochs=cfg.epochs, step=step, validate=validate,
                 lr=lambda s, total: cosine_lr(cfg.lr, s, total, warmup), seed=8000)
