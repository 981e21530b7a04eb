"""Phase `search`: the controller, by policy gradient on accuracy and latency.

Reward per image (training/reward.py): the paper's quadratic latency reward inside a window
[lower, upper], times `pos_weight` when the prediction is right, else `neg_weight`. Latency
is the service's cost model (service.architecture.CostTable over the run's latency.json:
controller, stem, executed blocks, head, and the executor's dispatch cost per call).

Two modes (`search.mode`):
- "variants" (the CPU recipe): one controller per operating point A, B, ..., each searched
  with its own window centred on a target latency relative to the MobileNetV2 path, warm-
  started from the previous point (A from the MobileNetV2 path itself), on the frozen
  pre-trained meta-graph; exploration (alpha) anneals towards 1 so samples can reach the
  window, and the entropy bonus anneals to 0.
- "paper": one search whose upper bound falls linearly over the epochs, alternating with
  meta-graph training on sampled policies; `variants` of evenly spaced epochs' controllers.
Both end with `variants`: [{name, controller, target_ratio, figures}], which the fine-tuning
and the export read.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from service.architecture import cheapest, mobilenet_v2
from service.manifest import GREEDY_THRESHOLD
from training import policy
from training.batchnorm import batch_statistics
from training.context import Context
from training.data import derive_seed
from training.evaluate import evaluate_controller
from training.latency import costs, load_table
from training.loop import steps
from training.optim import sgd
from training.reward import reward, upper_bound


def _clone(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Rewarder:
    """Rewards of sampled and greedy policies on one batch, from the frozen meta-graph."""

    def __init__(self, ctx: Context, metagraph, table: dict):
        self.metagraph = metagraph
        self.batchnorm = ctx.config.search.batchnorm
        self.cost = costs(table, ctx.space)
        self.block_ms = torch.as_tensor(self.cost.block_ms, dtype=torch.float32, device=ctx.device)
        self.fixed_ms = float(self.cost.latency_ms(np.zeros((1, *self.cost.block_ms.shape)), "controller")[0])

    def latency(self, policy: torch.Tensor) -> torch.Tensor:
        return self.fixed_ms + (self.metagraph.executed(policy).float() * self.block_ms).sum((1, 2))

    @torch.no_grad()
    def __call__(self, x, y, action, lower: float, upper: float, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batchnorm == "batch":
            with batch_statistics(self.metagraph):
                logits = self.metagraph.forward_selected(x, action)
        else:
            logits = self.metagraph.forward_selected(x, action)
        correct = logits.argmax(1) == y
        latency = self.latency(action)
        return reward(correct, latency, lower, upper, cfg.pos_weight, cfg.neg_weight), latency


def run(ctx: Context) -> dict:
    mode = ctx.config.search.mode
    if mode == "variants":
        return _variants(ctx)
    if mode == "paper":
        return _paper(ctx)
    raise ValueError(f"unknown search.mode {mode!r}: 'variants' or 'paper'")


def policy_step(controller, optimizer, rewarder: Rewarder, x, y, generator, alpha: float, beta: float,
                window: tuple[float, float], cfg) -> tuple[torch.Tensor, ...]:
    """One REINFORCE step of the controller on a batch: policies sampled (exploration `alpha`) and
    greedy, rewarded inside `window` (ms), the greedy reward as baseline, entropy bonus `beta`.
    Returns (sampled reward, sampled latency, greedy reward, greedy latency, loss), per image but the loss."""
    p = controller(x)
    explored = policy.explore(p, alpha)
    sampled = torch.bernoulli(explored.detach().cpu(), generator=generator).bool().to(p.device)
    greedy = p.detach() >= GREEDY_THRESHOLD
    r_s, latency_s = rewarder(x, y, sampled, *window, cfg)
    r_g, latency_g = rewarder(x, y, greedy, *window, cfg)
    loss = policy.loss(explored, sampled, r_s - r_g, beta, cfg.entropy)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return r_s, latency_s, r_g, latency_g, loss


def _variants(ctx: Context) -> dict:
    cfg = ctx.config.search
    space = ctx.space
    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(ctx.run.require("pretrain")["model"])
    metagraph.eval().requires_grad_(False)
    rewarder = Rewarder(ctx, metagraph, load_table(ctx.run))
    reference = rewarder.cost.baseline_ms  # static MobileNetV2, no controller
    lowest = float(rewarder.latency(torch.from_numpy(cheapest(space))[None].to(ctx.device))[0])
    state = ctx.run.load("search") or {"mode": "variants", "variants": [], "current": None, "done": False}
    if state.get("done"):
        return state
    controller = ctx.new_controller().start_at(mobilenet_v2(space), cfg.init_strength)
    every = max(1, ctx.config.checkpoint_steps)
    for v in range(len(state["variants"]), len(cfg.targets)):
        name, ratio = cfg.names[v], cfg.targets[v]
        target = ratio * reference
        optimizer = torch.optim.Adam(controller.parameters(), lr=cfg.lr)
        current, start = state.get("current"), 0
        if current and current["index"] == v:
            controller.load_state_dict(current["controller"])
            optimizer.load_state_dict(current["optimizer"])
            start = current["step"]
            lower, upper = current["window"]
            print(f"search {name}: resuming at step {start}", flush=True)
        else:
            if v:  # warm start from the previous operating point
                controller.load_state_dict(state["variants"][-1]["controller"])
            lower, upper = window(target, _greedy_latency(ctx, controller, rewarder, cfg), lowest, cfg.window)
            print(f"search {name}: target {target:.4g} ms, reward window [{lower:.4g}, {upper:.4g}] ms", flush=True)
        controller.train()
        sums = _Sums()
        t0 = time.time()

        def one(s: int, x, y) -> dict | None:
            x, y = ctx.to_device(x), y.to(ctx.device)
            alpha = policy.annealed(cfg.alpha, cfg.alpha_end, s, cfg.steps_per_variant)
            beta = policy.annealed(cfg.beta, cfg.beta_end, s, cfg.steps_per_variant)
            generator = torch.Generator().manual_seed(derive_seed(ctx.config.seed, 7000 + v, s))
            sums.add(*policy_step(controller, optimizer, rewarder, x, y, generator, alpha, beta, (lower, upper), cfg))
            if (s + 1) % cfg.log_steps and s + 1 != cfg.steps_per_variant:
                return None
            figures = {"variant": name, "step": s + 1, "alpha": alpha, "beta": beta, **sums.pop()}
            ctx.run.log("search", **figures)
            return {"reward": f"{figures['mean_reward']:.2f}", "greedy_ms": f"{figures['greedy_latency_ms']:.3f}"}

        def checkpoint(s: int) -> None:
            state["current"] = {"index": v, "step": s, "controller": _clone(controller),
                                "optimizer": optimizer.state_dict(), "window": (lower, upper)}
            ctx.run.save("search", state)

        steps(ctx, ctx.batches("train", cfg.batch_size, seed=7000 + v), start, cfg.steps_per_variant, one,
              desc=f"search {name} ({ratio}x)", checkpoint=checkpoint,
              every=lambda s: s % every == 0 and s < cfg.steps_per_variant)
        figures = {f"val_{k}": val for k, val in
                   evaluate_controller(ctx, metagraph, controller, rewarder.cost, "val").items()}
        figures.update(target_ms=target, lower_ms=lower, upper_ms=upper, reference_ms=reference,
                       seconds=round(time.time() - t0, 1))
        ctx.run.log("search", variant=name, status="variant done", **figures)
        print(f"search {name}: " + ", ".join(f"{k}={val:.4g}" for k, val in figures.items()), flush=True)
        state["variants"].append({"name": name, "target_ratio": ratio, "controller": _clone(controller), "figures": figures})
        state["current"] = None
        state["done"] = len(state["variants"]) == len(cfg.targets)
        ctx.run.save("search", state)
    return ctx.run.require("search")


def window(target: float, start: float, lowest: float, width: float) -> tuple[float, float]:
    """The reward window of one operating point: centred on `target` where it can be, wide enough
    (`width` x target each side) and always reaching above `start`, the latency the controller
    starts from, so that its first samples are rewarded and the gradient leads to the target.
    The lower bound never goes below the cheapest architecture."""
    upper = max(target * (1 + width), start * (1 + width / 2))
    lower = max(2 * target - upper, lowest)
    if upper <= lower * 1.05:  # a target at or below the cheapest architecture: aim just above it
        upper = lower * (1 + 2 * width)
    return lower, upper


@torch.no_grad()
def _greedy_latency(ctx: Context, controller, rewarder: Rewarder, cfg, batches: int = 4) -> float:
    """Mean latency of the controller's greedy architectures on a few training batches."""
    was_training = controller.training
    controller.eval()
    total, n = 0.0, 0
    for i, (x, _) in enumerate(ctx.batches("train", cfg.batch_size, seed=6999).epoch(0)):
        if i >= batches:
            break
        latency = rewarder.latency(controller(ctx.to_device(x)) >= GREEDY_THRESHOLD)
        total, n = total + float(latency.sum()), n + len(latency)
    controller.train(was_training)
    return total / max(n, 1)


class _Sums:
    """Running means of one logging window of the search."""

    def __init__(self):
        self.values: dict[str, float] = {}
        self.n = 0

    def add(self, r_s, latency_s, r_g, latency_g, loss) -> None:
        n = len(r_s)
        for key, value in (("mean_reward", r_s.sum()), ("nonzero_reward_share", (r_s != 0).float().sum()),
                           ("sampled_latency_ms", latency_s.sum()), ("greedy_reward", r_g.sum()),
                           ("greedy_latency_ms", latency_g.sum()), ("loss", loss.detach() * n)):
            self.values[key] = self.values.get(key, 0.0) + float(value)
        self.n += n

    def pop(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.values.items()}
        self.values, self.n = {}, 0
        return out


def bounds(block_ms: np.ndarray, space, start: float, end: float) -> tuple[float, float, float]:
    """(lower, upper at the first epoch, upper at the last) of the paper's search, in block
    milliseconds: the cheapest architecture; `start` x all modules; `end` x MobileNetV2."""
    lower = float((block_ms * cheapest(space)).sum())
    return lower, start * float(block_ms.sum()), end * float((block_ms * mobilenet_v2(space)).sum())


def _paper(ctx: Context) -> dict:
    """The published search: a falling upper bound, controller epochs alternating with meta-graph epochs."""
    cfg = ctx.config.search
    space = ctx.space
    metagraph, controller = ctx.new_metagraph(), ctx.new_controller()
    rewarder = Rewarder(ctx, metagraph, load_table(ctx.run))
    block_ms = rewarder.cost.block_ms
    rewarder.fixed_ms = 0.0  # the paper's bounds count blocks only
    lower, upper_start, upper_end = bounds(block_ms, space, cfg.upper_start, cfg.upper_end)
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
        lower, upper_start, upper_end = (state["bounds"][k] for k in ("lower", "upper_start", "upper_end"))
    else:
        metagraph.load_state_dict(ctx.run.require("pretrain")["model"])
    for epoch in range(start, cfg.epochs):
        upper = max(upper_bound(epoch, cfg.epochs, upper_start, upper_end), lower * 1.05)
        t0 = time.time()
        controller.train()
        metagraph.eval()
        sums = _Sums()

        def search_step(i: int, x, y) -> None:
            x, y = ctx.to_device(x), y.to(ctx.device)
            generator = torch.Generator().manual_seed(derive_seed(ctx.config.seed, 1000 + epoch, i))
            sums.add(*policy_step(controller, c_opt, rewarder, x, y, generator, cfg.alpha, cfg.beta, (lower, upper), cfg))

        def metagraph_step(i: int, x, y) -> None:
            """Meta-graph training on the controller's sampled policies, shuffled within the batch."""
            x, y = ctx.to_device(x), y.to(ctx.device)
            generator = torch.Generator().manual_seed(derive_seed(ctx.config.seed, 2000 + epoch, i))
            with torch.no_grad():
                sampled = torch.bernoulli(policy.explore(controller(x), cfg.alpha).cpu(), generator=generator).bool()
                sampled = sampled[torch.randperm(len(y), generator=generator)].to(x.device)
            loss = F.cross_entropy(metagraph.forward_selected(x, sampled), y)
            m_opt.zero_grad(set_to_none=True)
            loss.backward()
            m_opt.step()

        batches = ctx.batches("train", cfg.batch_size, seed=1000 + epoch)
        steps(ctx, batches, 0, min(cfg.steps_per_epoch or len(batches), len(batches)), search_step,
              desc=f"search {epoch + 1}/{cfg.epochs}")
        controller.eval()
        metagraph.train()
        batches = ctx.batches("train", ctx.config.data.batch_size, seed=2000 + epoch)
        steps(ctx, batches, 0, min(cfg.metagraph_steps or len(batches), len(batches)), metagraph_step,
              desc=f"meta-graph {epoch + 1}/{cfg.epochs}")
        metagraph.eval()
        figures = {"epoch": epoch + 1, "upper_ms": upper, "lower_ms": lower, **sums.pop(),
                   **{f"val_{k}": v for k, v in evaluate_controller(ctx, metagraph, controller, rewarder.cost).items()},
                   "seconds": round(time.time() - t0, 1)}
        history.append({**figures, "controller": _clone(controller)})
        ctx.run.log("search", **figures)
        print(f"search epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
        done = epoch + 1 == cfg.epochs
        ctx.run.save("search", {"mode": "paper", "metagraph": metagraph.state_dict(), "controller": controller.state_dict(),
                                "metagraph_optimizer": m_opt.state_dict(), "controller_optimizer": c_opt.state_dict(),
                                "epoch": epoch + 1, "done": done, "history": history,
                                "variants": _paper_variants(history, cfg.names) if done else [],
                                "bounds": {"lower": lower, "upper_start": upper_start, "upper_end": upper_end}})
    return ctx.run.require("search")


def _paper_variants(history: list[dict], names: tuple[str, ...]) -> list[dict]:
    """Evenly spaced epochs' controllers, the earliest (slowest, most accurate) first."""
    picks = np.unique(np.linspace(0, len(history) - 1, num=min(len(names), len(history))).round().astype(int))
    return [{"name": names[i], "target_ratio": None, "controller": history[e]["controller"],
             "figures": {k: v for k, v in history[e].items() if k != "controller"}} for i, e in enumerate(picks)]
