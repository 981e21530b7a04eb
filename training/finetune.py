"""Phase 3: fine-tune the meta-graph on the frozen controller's greedy policies."""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

from service.manifest import GREEDY_THRESHOLD
from training.context import Context
from training.evaluate import evaluate
from training.latency import block_latency, block_mflops
from training.optim import cosine_lr, sgd


def greedy(controller, threshold: float = GREEDY_THRESHOLD):
    return lambda x: controller(x) >= threshold


@torch.no_grad()
def evaluate_controller(ctx: Context, metagraph, controller, table: dict) -> dict:
    """Test accuracy with the controller's greedy policies, and the mean cost of what ran."""
    was_training = controller.training
    controller.eval()
    result = evaluate(metagraph, ctx.batches("test"), greedy(controller))
    controller.train(was_training)
    fixed_ms = table["stem"]["latency_ms"] + table["head"]["latency_ms"] + table["controller"]["latency_ms"]
    fixed_mflops = table["stem"]["mflops"] + table["head"]["mflops"] + table["controller"]["mflops"]
    usage = result["usage"]
    return {"top1": result["top1"], "images": result["images"], "modules": result["modules"],
            "latency_ms": float((usage * block_latency(table)).sum()) + fixed_ms,
            "mflops": float((usage * block_mflops(table)).sum()) + fixed_mflops}


def run(ctx: Context) -> dict:
    from training.latency import load_table

    cfg = ctx.config.finetune
    table = load_table(ctx.run)
    metagraph, controller = ctx.new_metagraph(), ctx.new_controller()
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    state = ctx.run.load("finetune")
    start = 0
    if state is not None:
        if state.get("done"):
            return state
        metagraph.load_state_dict(state["metagraph"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        controller.load_state_dict(state["controller"])
    else:
        search = ctx.run.require("search")
        metagraph.load_state_dict(search["metagraph"])
        if cfg.controller_epoch is None:
            controller.load_state_dict(search["controller"])
        else:
            history = search["history"]
            if not 1 <= cfg.controller_epoch <= len(history):
                raise ValueError(f"finetune.controller_epoch must be in 1..{len(history)}")
            controller.load_state_dict(history[cfg.controller_epoch - 1]["controller"])
    controller.eval().requires_grad_(False)
    policy_fn = greedy(controller)
    batches = ctx.batches("train")
    total = cfg.epochs * len(batches)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        metagraph.train()
        for i, (x, y) in enumerate(tqdm(batches.epoch(3000 + epoch), total=len(batches), desc=f"finetune {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=5)):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.lr, epoch * len(batches) + i, total)
            x, y = ctx.to_device(x), y.to(ctx.device)
            with torch.no_grad():
                policy = policy_fn(x)
            loss = F.cross_entropy(metagraph.forward_selected(x, policy), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        figures = {"epoch": epoch + 1, **{f"test_{k}": v for k, v in evaluate_controller(ctx, metagraph, controller, table).items()},
                   "seconds": round(time.time() - t0, 1)}
        ctx.run.log("finetune", **figures)
        print(f"finetune epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
        ctx.run.save("finetune", {"metagraph": metagraph.state_dict(), "controller": controller.state_dict(),
                                  "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                  "done": epoch + 1 == cfg.epochs})
    return ctx.run.require("finetune")
