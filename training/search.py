"""Phase 2: controller search by policy gradient, alternating with meta-graph training.

Per controller step (see ../shared/docs/INSTANAS.md): exploration p' = alpha p + (1 - alpha)(1 - p);
sample a policy from Bernoulli(p'); the self-critical baseline is the reward of the
greedy policy (p >= 0.5) on the same images; loss = [-sum log pi(a) * advantage
- beta * entropy(p')] / batch. The upper latency bound falls linearly over the epochs,
so each epoch's controller is one point of the accuracy/latency frontier (kept in the
checkpoint's `history`). After each controller epoch, the meta-graph trains on policies
sampled from the controller.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from service.architecture import cheapest, mobilenet_v2
from service.manifest import GREEDY_THRESHOLD
from training.context import Context
from training.finetune import evaluate_controller
from training.latency import block_latency, load_table
from training.optim import sgd
from training.reward import reward, upper_bound


def _steps(batches, limit: int | None):
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


def bounds(table: np.ndarray, space, start: float, end: float) -> tuple[float, float, float]:
    """(lower, upper at the first epoch, upper at the last) in the table's unit (ms):
    the cheapest architecture; `start` x all modules; `end` x MobileNetV2."""
    lower = float((table * cheapest(space)).sum())
    return lower, start * float(table.sum()), end * float((table * mobilenet_v2(space)).sum())


def run(ctx: Context) -> dict:
    cfg = ctx.config.search
    space = ctx.space
    table_full = load_table(ctx.run)
    table = block_latency(table_full)
    lower, upper_start, upper_end = bounds(table, space, cfg.upper_start, cfg.upper_end)
    metagraph, controller = ctx.new_metagraph(), ctx.new_controller()
    c_opt = torch.optim.Adam(controller.parameters(), lr=cfg.lr)
    m_opt = sgd(metagraph.parameters(), cfg.metagraph_lr, 0.9, ctx.config.pretrain.weight_decay)
    state = ctx.run.load("search")
    start, history = 0, []
    if state is not None:
        if state.get("done"):
            return state
        metagraph.load_state_dict(state["metagraph"])
        controller.load_state_dict(state["controller"])
        c_opt.load_state_dict(state["controller_optimizer"])
        m_opt.load_state_dict(state["metagraph_optimizer"])
        start, history = state["epoch"], state["history"]
        # the bounds the search started with, even if the latency table was re-measured since
        lower, upper_start, upper_end = (state["bounds"][k] for k in ("lower", "upper_start", "upper_end"))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
    else:
        metagraph.load_state_dict(ctx.run.require("pretrain")["model"])
    table_t = torch.as_tensor(table, dtype=torch.float32, device=ctx.device)
    for epoch in range(start, cfg.epochs):
        # The last epoch's bound may not fall below the cheapest architecture's latency.
        upper = max(upper_bound(epoch, cfg.epochs, upper_start, upper_end), lower * 1.05)
        t0 = time.time()
        controller.train()
        metagraph.eval()
        sums = {"reward": 0.0, "advantage": 0.0, "latency": 0.0, "loss": 0.0, "n": 0}
        batches = ctx.batches("train", cfg.batch_size, seed=1000 + epoch)
        bar = tqdm(_steps(batches, cfg.steps_per_epoch), total=cfg.steps_per_epoch or len(batches),
                   desc=f"search {epoch + 1}/{cfg.epochs}", unit="step", mininterval=5)
        for x, y in bar:
            x, y = ctx.to_device(x), y.to(ctx.device)
            p = controller(x)
            explore = cfg.alpha * p + (1 - cfg.alpha) * (1 - p)
            sampled = torch.bernoulli(explore.detach()).bool()
            greedy = p.detach() >= GREEDY_THRESHOLD
            with torch.no_grad():
                correct_s = metagraph.forward_selected(x, sampled).argmax(1) == y
                correct_g = metagraph.forward_selected(x, greedy).argmax(1) == y
                latency_s = (metagraph.executed(sampled).float() * table_t).sum((1, 2))
                latency_g = (metagraph.executed(greedy).float() * table_t).sum((1, 2))
                r_s = reward(correct_s, latency_s, lower, upper, cfg.pos_weight, cfg.neg_weight)
                r_g = reward(correct_g, latency_g, lower, upper, cfg.pos_weight, cfg.neg_weight)
                advantage = r_s - r_g
            explore = explore.clamp(1e-6, 1 - 1e-6)
            log_prob = torch.where(sampled, explore.log(), (1 - explore).log()).sum((1, 2))
            entropy = -(explore * explore.log() + (1 - explore) * (1 - explore).log()).sum((1, 2))
            loss = (-(log_prob * advantage) - cfg.beta * entropy).sum() / len(y)
            c_opt.zero_grad(set_to_none=True)
            loss.backward()
            c_opt.step()
            n = len(y)
            sums["n"] += n
            sums["reward"] += r_s.sum().item()
            sums["advantage"] += advantage.sum().item()
            sums["latency"] += latency_s.sum().item()
            sums["loss"] += loss.item() * n
        # Meta-graph training on the controller's sampled policies, shuffled within the batch.
        controller.eval()
        metagraph.train()
        batches = ctx.batches("train", ctx.config.data.batch_size, seed=2000 + epoch)
        for x, y in tqdm(_steps(batches, cfg.metagraph_steps), total=cfg.metagraph_steps or len(batches),
                         desc=f"search {epoch + 1}/{cfg.epochs} meta-graph", unit="step", mininterval=5):
            x, y = ctx.to_device(x), y.to(ctx.device)
            with torch.no_grad():
                p = controller(x)
                policy = torch.bernoulli(cfg.alpha * p + (1 - cfg.alpha) * (1 - p)).bool()
                policy = policy[torch.randperm(len(y), device=policy.device)]
            loss = F.cross_entropy(metagraph.forward_selected(x, policy), y)
            m_opt.zero_grad(set_to_none=True)
            loss.backward()
            m_opt.step()
        n = max(sums.pop("n"), 1)
        figures = {"epoch": epoch + 1, "upper_ms": upper, "lower_ms": lower,
                   **{f"mean_{k}": v / n for k, v in sums.items()},
                   **{f"test_{k}": v for k, v in evaluate_controller(ctx, metagraph, controller, table_full).items()},
                   "seconds": round(time.time() - t0, 1)}
        # a copy: state_dict() holds the live tensors, which the next epochs keep changing
        history.append({**figures, "controller": {k: v.detach().cpu().clone() for k, v in controller.state_dict().items()}})
        ctx.run.log("search", **figures)
        print(f"search epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
        ctx.run.save("search", {"metagraph": metagraph.state_dict(), "controller": controller.state_dict(),
                                "metagraph_optimizer": m_opt.state_dict(), "controller_optimizer": c_opt.state_dict(),
                                "epoch": epoch + 1, "done": epoch + 1 == cfg.epochs, "history": history,
                                "rng": torch.get_rng_state(),
                                "bounds": {"lower": lower, "upper_start": upper_start, "upper_end": upper_end}})
    return ctx.run.require("search")
