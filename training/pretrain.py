"""Phase 1: one-shot pre-training of the meta-graph on sampled policies."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from service.architecture import cheapest, mobilenet_v2
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.optim import cosine_lr, sgd
from training.sampling import drop_path_policy, sparse_policy


def path_accuracies(ctx: Context, metagraph, limit_batches: int | None = None) -> dict:
    """Accuracy of the fixed paths that matter for the frontier: all, MobileNetV2, cheapest."""
    space = ctx.space
    paths = {
        "all": np.ones((space.num_cells, space.num_modules), bool),
        "mobilenet_v2": mobilenet_v2(space),
        "cheapest": cheapest(space),
    }
    out = {}
    for name, matrix in paths.items():
        out[f"top1_{name}"] = evaluate(metagraph, ctx.batches("test"), fixed_policy(matrix))["top1"]
    return out


def run(ctx: Context) -> dict:
    cfg = ctx.config.pretrain
    space = ctx.space
    metagraph = ctx.new_metagraph()
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    start = 0
    state = ctx.run.load("pretrain")
    if state is not None and state.get("done"):
        return state
    batches = ctx.batches("train")
    total_steps = cfg.epochs * len(batches)
    generator = torch.Generator().manual_seed(ctx.config.seed + 1)
    if state is not None:
        metagraph.load_state_dict(state["metagraph"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        if "sampler_rng" in state:  # so a resumed run samples what an uninterrupted one would
            generator.set_state(state["sampler_rng"])
    for epoch in range(start, cfg.epochs):
        metagraph.train()
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = tqdm(batches.epoch(epoch), total=len(batches), desc=f"pretrain {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=5)
        for i, (x, y) in enumerate(bar):
            step = epoch * len(batches) + i
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.lr, step, total_steps, int(cfg.warmup_epochs * len(batches)))
            if cfg.sampling == "drop_path":
                # every module on for the first half of the steps, then keep falls linearly to 0.5
                half = total_steps // 2
                keep = 1.0 if step < half else 1.0 - 0.5 * (step - half) / max(total_steps - half, 1)
                policy = drop_path_policy(len(y), space, keep, generator)
            elif cfg.sampling == "sparse" and epoch < cfg.dense_epochs:
                policy = torch.ones(len(y), space.num_cells, space.num_modules, dtype=torch.bool)
            elif cfg.sampling == "sparse":
                policy = sparse_policy(len(y), space, cfg.fixed_path_rows, generator)
            else:
                raise ValueError(f"unknown pretrain sampling {cfg.sampling!r}")
            x, y = ctx.to_device(x), y.to(ctx.device)
            logits = metagraph.forward_selected(x, policy.to(ctx.device))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(metagraph.parameters(), cfg.grad_clip)
            optimizer.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        figures = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen,
                   "seconds": round(time.time() - t0, 1), **path_accuracies(ctx, metagraph)}
        ctx.run.log("pretrain", **figures)
        print(f"pretrain epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
        ctx.run.save("pretrain", {"metagraph": metagraph.state_dict(), "optimizer": optimizer.state_dict(),
                                  "sampler_rng": generator.get_state(), "epoch": epoch + 1, "done": epoch + 1 == cfg.epochs, "figures": figures})
    return ctx.run.require("pretrain")
