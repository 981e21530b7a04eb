"""Phase `route` (optional, `route.enabled`): controllers that choose per image among the
search's architectures, trained to predict which of them classify the image right.

Why: on 2 CPU cores the search's policy-gradient controllers each settled on one static
architecture (docs/RESULTS.md, "operating points A..E"), while an oracle choosing per image among those same
architectures reaches the baseline's accuracy at well under their cost
(`scripts/oracle_router.py`). So the per-image signal is in the meta-graph; the search did
not find it in 400 REINFORCE steps over 85 independent modules.

How: the candidates are the most frequent architectures of the search's operating points
(on validation), each with its estimated latency from the run's table. One `Router` trunk
(the controller's network, K outputs) learns, on augmented training images, the probability
that the fine-tuned meta-graph classifies the image right with each candidate (binary cross-
entropy against what the meta-graph actually does, computed batch by batch). Each operating
point is then that trunk with a price on latency: an image takes the candidate maximising
P(right) - price x latency, and the point's price is the lowest whose mean estimated latency
on validation fits the point's target (`route.targets` x the static MobileNetV2 path's
latency). The routers replace the search's controllers in the export and the report; they
keep the controller's contract (an image in, a 0/1 map of the modules to run out), so the
bundle and the service do not change.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service import architecture
from training.context import Context
from training.controller import Controller
from training.data import derive_seed
from training.evaluate import evaluate, evaluate_controller, greedy
from training.latency import costs, load_table
from training.loop import train


class Router(nn.Module):
    """An image -> the (cells, modules) 0/1 map of one of K candidate architectures.

    `correct_logits(x)`: K logits of P(the meta-graph classifies x right with candidate k).
    `forward(x)`: the candidate maximising sigmoid(logit) - price * latency_ms, as floats.
    """

    def __init__(self, trunk: Controller, candidates: np.ndarray, latency_ms: np.ndarray, price: float = 0.0):
        super().__init__()
        self.trunk = trunk
        self.trunk.fc = nn.Linear(trunk.fc.in_features, len(candidates))
        self.register_buffer("candidates", torch.as_tensor(np.asarray(candidates), dtype=torch.float32))
        self.register_buffer("latency_ms", torch.as_tensor(np.asarray(latency_ms), dtype=torch.float32))
        self.register_buffer("price", torch.tensor(float(price)))

    def correct_logits(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        if t.downsample > 1:
            x = F.avg_pool2d(x, t.downsample)
        return t.fc(t.stages(t.stem(x)).mean(dim=(2, 3)))

    def choose(self, p_right: torch.Tensor) -> torch.Tensor:
        return (p_right - self.price * self.latency_ms).argmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.candidates[self.choose(torch.sigmoid(self.correct_logits(x)))]


def candidates_of(ctx: Context, metagraph, search: dict) -> list[str]:
    """The most frequent architecture of every search point on validation, slowest point first, once each."""
    from training.finetune import controllers

    codes: list[str] = []
    for controller in controllers(ctx, search).values():
        result = evaluate(metagraph, ctx.batches("val"), greedy(controller))
        top = max(result["codes"].items(), key=lambda item: item[1])[0]
        if top not in codes:
            codes.append(top)
    return codes


def new_router(ctx: Context, codes: list[str], table: dict, price: float = 0.0) -> Router:
    space = ctx.space
    matrices = np.stack([architecture.decode(c, space.num_cells, space.num_modules) for c in codes])
    latency = costs(table, space).latency_ms(matrices)  # blocks, stem, head: the part that differs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.config.seed, 103))
        router = Router(ctx.new_controller(), matrices, latency, price)
    return router.to(ctx.device)


@torch.no_grad()
def right_with_each(metagraph, router: Router, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, K) 1.0 where the meta-graph classifies the row right with candidate k."""
    n = len(y)
    return torch.stack([metagraph.forward_selected(x, m.bool().expand(n, *m.shape)).argmax(1) == y
                        for m in router.candidates], 1).float()


@torch.no_grad()
def right_on(ctx: Context, metagraph, router: Router, split: str) -> np.ndarray:
    """(N, K) booleans: the meta-graph right on each image of `split` with each candidate."""
    return np.concatenate([right_with_each(metagraph, router, ctx.to_device(x), y.to(ctx.device)).cpu().numpy()
                           for x, y in ctx.batches(split)]).astype(bool)


def static_mix_top1(right: np.ndarray, latency_ms: np.ndarray, target_ms: float) -> float:
    """Top-1 of the best random mix of two candidates at `target_ms` mean latency: what the
    routers must beat (the static frontier between the candidates, linearly interpolated)."""
    top1 = right.mean(0)
    best = float(top1[latency_ms <= target_ms].max()) if (latency_ms <= target_ms).any() else float("nan")
    for i in range(len(top1)):
        for j in range(len(top1)):
            if latency_ms[i] > target_ms >= latency_ms[j]:
                share = (target_ms - latency_ms[j]) / (latency_ms[i] - latency_ms[j])
                best = max(best, float(share * top1[i] + (1 - share) * top1[j]))
    return best


@torch.no_grad()
def probabilities(ctx: Context, router: Router, split: str) -> np.ndarray:
    router.eval()
    return np.concatenate([torch.sigmoid(router.correct_logits(ctx.to_device(x))).cpu().numpy()
                           for x, _ in ctx.batches(split)])


def calibrate(p_right: np.ndarray, latency_ms: np.ndarray, target_ms: float, steps: int = 60) -> float:
    """The lowest price whose choices' mean latency is at most `target_ms` (0 when even the
    most-likely-right choices fit; the cheapest candidate everywhere when nothing else does)."""
    def mean_latency(price: float) -> float:
        return float(latency_ms[(p_right - price * latency_ms).argmax(1)].mean())

    if mean_latency(0.0) <= target_ms:
        return 0.0
    low, high = 0.0, 1.0
    while mean_latency(high) > target_ms and high < 1e6:
        low, high = high, high * 4
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (low, mid) if mean_latency(mid) <= target_ms else (mid, high)
    return high


def run(ctx: Context) -> dict | None:
    cfg = ctx.config.route
    if not cfg.enabled:
        return None
    state = ctx.run.load("route")
    if state is not None and state.get("done") and state["epoch"] >= cfg.epochs and \
            [(v["name"], v["target_ratio"]) for v in state["variants"]] == list(zip(cfg.names, cfg.targets)):
        return state  # else: more epochs, or other points: go on from the trained router
    search = ctx.run.require("search")
    table = load_table(ctx.run)
    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(ctx.run.require("finetune")["model"])
    metagraph.eval().requires_grad_(False)
    codes = state["candidates"] if state else candidates_of(ctx, metagraph, search)
    router = new_router(ctx, codes, table)
    optimizer = torch.optim.Adam(router.parameters(), lr=cfg.lr)

    def step(x, y, _generator, _step, _forward):
        target = right_with_each(metagraph, router, x, y)
        return F.binary_cross_entropy_with_logits(router.correct_logits(x), target), None  # it does not classify

    trained = train(ctx, "route", router, optimizer, epochs=cfg.epochs, step=step, validate=dict,
                    lr=lambda _step, _total: cfg.lr, seed=8000, extra={"candidates": codes})
    # one price per operating point, on validation
    cost = costs(table, ctx.space)
    reference = cost.baseline_ms
    p_val = probabilities(ctx, router, "val")
    right_val = right_on(ctx, metagraph, router, "val")
    latency = router.latency_ms.cpu().numpy()
    variants, figures = [], {}
    nothing = np.zeros((1, *cost.block_ms.shape))
    controller_ms = float(cost.latency_ms(nothing, "controller")[0] - cost.latency_ms(nothing)[0])
    for name, ratio in zip(cfg.names, cfg.targets):
        # the target counts the controller, as the search's do; the candidates' latencies do not
        target = ratio * reference - controller_ms
        router.price.fill_(calibrate(p_val, latency, target))
        figures[name] = evaluate_controller(ctx, metagraph, router.eval(), cost, "val")
        figures[name]["top1_static_mix"] = static_mix_top1(right_val, latency, figures[name]["latency_ms"] - controller_ms)
        variants.append({"name": name, "target_ratio": ratio, "price": float(router.price),
                         "router": {k: v.detach().cpu().clone() for k, v in router.state_dict().items()}})
        ctx.run.log("route", variant=name, target_ratio=ratio, price=float(router.price),
                    **{f"val_{k}": v for k, v in figures[name].items()})
        print(f"route {name}: price {float(router.price):.4g}, "
              + ", ".join(f"val_{k}={v:.4g}" for k, v in figures[name].items()), flush=True)
    state = {**trained, "candidates": codes, "variants": variants, "figures": figures}
    ctx.run.save("route", state)
    return state


def points(ctx: Context) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The run's operating points as frozen modules by name, and their validation figures:
    the routers when the route phase ran, else the search's controllers as fine-tuned."""
    from training.finetune import controllers

    if ctx.config.route.enabled:
        state = ctx.run.require("route")
        out = {}
        for variant in state["variants"]:
            router = new_router(ctx, state["candidates"], load_table(ctx.run))
            router.load_state_dict(variant["router"])
            out[variant["name"]] = router.eval().requires_grad_(False)
        return out, state["figures"]
    return controllers(ctx, ctx.run.require("search")), ctx.run.require("finetune")["figures"]
