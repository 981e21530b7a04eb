"""Phase `pretrain`: one-shot training of the meta-graph, so that any path is a decent network.

Three ways to sample the paths a batch trains (`pretrain.sampling`):
- "sandwich" (the CPU recipe): every step trains the all-modules path on the batch with
  the labels, and a second pass in which rows take the MobileNetV2 path, the cheapest
  path or random sparse paths, distilled from the all-modules path's predictions
  (in-place distillation, as BigNAS and Once-for-All train their super-networks). With
  `warm_start`, stem, module 0 of every cell and head start from the finished baseline and
  every other module's last batch norm starts at zero, so the meta-graph starts exactly
  equal to the trained MobileNetV2 and can only add to it (with the "sum" merge). With
  `teacher = "baseline"`, the second pass learns from the finished MobileNetV2 (frozen)
  instead: a teacher as good as the baseline from the first step, where the all-modules
  path is still recovering from its new modules.
- "sparse": per-row sparse paths (a uniformly drawn number of modules per cell), with
  `dense_epochs` of all modules first;
- "drop_path": the paper's schedule (all modules for the first half, then each kept with a
  probability falling linearly to 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.architecture import cheapest, mobilenet_v2
from training import baseline
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.loop import train
from training.metagraph import MetaGraph
from training.optim import cosine_lr, decay_groups, sgd
from training.sampling import drop_path_policy, sandwich_policy, sparse_policy


def fixed_paths(space) -> dict[str, np.ndarray]:
    """The paths that bound the frontier: every module, MobileNetV2, the cheapest."""
    return {"all": np.ones((space.num_cells, space.num_modules), bool), "mobilenet_v2": mobilenet_v2(space),
            "cheapest": cheapest(space)}


def path_accuracies(ctx: Context, metagraph, split: str = "val") -> dict:
    """Top-1 of each fixed path on `split`, with the batch-norm statistics the meta-graph has."""
    return {f"{split}_top1_{name}": evaluate(metagraph, ctx.batches(split), fixed_policy(matrix))["top1"]
            for name, matrix in fixed_paths(ctx.space).items()}


def _last_batch_norm(module: nn.Module) -> nn.BatchNorm2d:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1]


@torch.no_grad()
def warm_start(metagraph: MetaGraph, baseline_state: dict) -> None:
    """Copy the baseline into stem, module 0 of every cell and head; silence every other module."""
    own = metagraph.state_dict()
    for key, value in baseline_state.items():  # `cells.<c>.0.*` names module 0 in both
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"baseline weight {key} does not fit the meta-graph")
        own[key].copy_(value)
    for cell in metagraph.cells:
        for module in list(cell)[1:]:
            bn = _last_batch_norm(module)
            bn.weight.zero_()
            bn.bias.zero_()


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax outputs, per row, averaged."""
    return F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")


def run(ctx: Context) -> dict:
    cfg = ctx.config.pretrain
    space = ctx.space
    metagraph = ctx.new_metagraph()
    if cfg.warm_start and not ctx.run.checkpoint("pretrain").exists():
        warm_start(metagraph, baseline.load(ctx).state_dict())
    params = decay_groups(metagraph, cfg.weight_decay) if cfg.sampling == "sandwich" else metagraph.parameters()
    optimizer = sgd(params, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = len(ctx.batches("train"))
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    teacher = baseline.teacher(ctx) if cfg.sampling == "sandwich" and cfg.teacher == "baseline" else None

    def step(x, y, generator, s, forward):
        n = len(y)
        if cfg.sampling == "sandwich":
            everything = torch.ones(n, space.num_cells, space.num_modules, dtype=torch.bool, device=x.device)
            full, sub = forward(x, [everything, sandwich_policy(n, space, generator).to(x.device)])
            target = full.detach() if teacher is None else teacher(x)
            loss = F.cross_entropy(full, y) + cfg.distill * distillation(sub, target) \
                + (1 - cfg.distill) * F.cross_entropy(sub, y)
            return loss, full
        if cfg.sampling == "drop_path":
            half = total_steps // 2
            keep = 1.0 if s < half else 1.0 - 0.5 * (s - half) / max(total_steps - half, 1)
            policy = drop_path_policy(n, space, keep, generator)
        elif cfg.sampling == "sparse" and s < cfg.dense_epochs * steps_per_epoch:
            policy = torch.ones(n, space.num_cells, space.num_modules, dtype=torch.bool)
        elif cfg.sampling == "sparse":
            policy = sparse_policy(n, space, cfg.fixed_path_rows, generator)
        else:
            raise ValueError(f"unknown pretrain sampling {cfg.sampling!r}")
        [logits] = forward(x, [policy.to(x.device)])
        return F.cross_entropy(logits, y), logits

    return train(ctx, "pretrain", metagraph, optimizer, epochs=cfg.epochs, step=step,
                 lr=lambda s, total: cosine_lr(cfg.lr, s, total, warmup),
                 validate=lambda: path_accuracies(ctx, metagraph), grad_clip=cfg.grad_clip, seed=6000)
