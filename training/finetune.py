"""Phase `finetune`: one shared meta-graph for every operating point, then batch-norm re-estimation.

Each step trains the meta-graph on a mix of the search's operating points: every row of a
batch takes the greedy architecture of one point's frozen controller (rows dealt to points
at random), so all points run the same blocks. After the last epoch the batch-norm
statistics are re-estimated on the same mix, and each point is evaluated on the validation
split. With `teacher = "baseline"` the rows also learn the finished MobileNetV2's predictions
(weight `distill`), as the sampled paths do in pre-training.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from training import baseline
from training.batchnorm import reestimate
from training.context import Context
from training.evaluate import evaluate_controller, greedy
from training.latency import costs, load_table
from training.loop import train
from training.optim import cosine_lr, decay_groups, sgd
from training.pretrain import distillation


def controllers(ctx: Context, search: dict) -> dict:
    """The search's operating points as frozen controllers in eval mode, by name."""
    out = {}
    for variant in search["variants"]:
        controller = ctx.new_controller()
        controller.load_state_dict(variant["controller"])
        out[variant["name"]] = controller.eval().requires_grad_(False)
    return out


def mixed_policy(points: list, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row's greedy architecture under one of `points`, rows dealt to points at random."""
    with torch.no_grad():
        owner = torch.randint(len(points), (x.shape[0],), generator=generator).to(x.device)
        policy = torch.stack([greedy(c)(x) for c in points])  # (points, N, cells, modules)
        return policy[owner, torch.arange(x.shape[0], device=x.device)]


def run(ctx: Context) -> dict:
    cfg = ctx.config.finetune
    search = ctx.run.require("search")
    points = controllers(ctx, search)
    metagraph = ctx.new_metagraph()
    if not ctx.run.checkpoint("finetune").exists():
        start = search.get("metagraph") or ctx.run.require("pretrain")["model"]
        metagraph.load_state_dict(start)
    optimizer = sgd(decay_groups(metagraph, cfg.weight_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    cost = costs(load_table(ctx.run), ctx.space)
    deck = list(points.values())
    teacher = baseline.teacher(ctx) if cfg.teacher == "baseline" else None

    def step(x, y, generator, _step, forward):
        [logits] = forward(x, [mixed_policy(deck, x, generator)])
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            loss = (1 - cfg.distill) * loss + cfg.distill * distillation(logits, teacher(x))
        return loss, logits

    def validate() -> dict:
        return {f"val_top1_{name}": evaluate_controller(ctx, metagraph, c, cost)["top1"] for name, c in points.items()}

    state = train(ctx, "finetune", metagraph, optimizer, epochs=cfg.epochs, step=step, validate=validate,
                  lr=lambda s, total: cosine_lr(cfg.lr, s, total), seed=3000)
    if "figures" in state:
        return state
    generator = torch.Generator().manual_seed(ctx.config.seed + 4000)
    used = reestimate(metagraph, ctx.batches("train", seed=4000),
                      lambda x: metagraph.forward_selected(ctx.to_device(x), mixed_policy(deck, ctx.to_device(x), generator)),
                      cfg.bn_images)
    figures = {name: evaluate_controller(ctx, metagraph, c, cost) for name, c in points.items()}
    for name, f in figures.items():
        ctx.run.log("finetune", variant=name, bn_images=used, **{f"val_{k}": v for k, v in f.items()})
        print(f"finetune {name}: " + ", ".join(f"val_{k}={v:.4g}" for k, v in f.items()), flush=True)
    state.update(model=metagraph.state_dict(), figures=figures,
                 controllers={v["name"]: v["controller"] for v in search["variants"]})
    ctx.run.save("finetune", state)
    return state
