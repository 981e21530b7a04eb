"""Phase `report`: the frontier, measured the way the service runs it, with the controls.

On the test split (read here and nowhere else), through the service's own executor:
- every operating point: top-1, mean latency per image at batch 1 (controller included),
  per-block and with a warm fused-graph cache, MFLOPs, modules executed, distinct
  architectures;
- the static MobileNetV2 baseline bundle of the same width, the same way, and its learning
  curve (validation top-1 against epochs and wall-clock) from the baseline phase;
- controls that show the controller is instance-aware: each point's policies shuffled
  across images (same architectures, random assignment), and its best static twin (the best
  on validation among its most frequent architectures and latency-matched MobileNetV2 paths
  with cells skipped, one architecture for every image, batch norm re-estimated), each
  compared with the point by a paired bootstrap 95% interval of the accuracy difference;
- the rank correlation between an image's chosen-architecture latency and its difficulty
  (the baseline's loss on it);
- with phase `coadapt`: each cascade at its own thresholds with each full-resolution last
  stage (the baseline, its co-adapted copy, the copy fine-tuned on random images), at equal cost.
Writes `report.json`, `FRONTIER.md`, `frontier.png`, `learning_curve.png` and
`difficulty.png` into the report folder.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from service import architecture, imaging
from service.bundle import load_bundle
from service.cascade import blend, confidence, pool
from service.executor import Executor
from service.manifest import static_twin_folder
from service.fused import FusedCache
from training import baseline as baseline_phase
from training import coadapt
from training.batchnorm import reestimate
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.rundir import RunError, write_atomic
from training.stats import bootstrap_difference

# InstaNAS-C10 A..E and MobileNetV2 widths: (top-1 %, latency relative to MobileNetV2 1.0x),
# from the paper's CIFAR-10 table (../shared/docs/INSTANAS.md), another scale and machine.
PAPER_POINTS = {"A": (95.70, 1 - 0.076), "B": (95.50, 1 - 0.402), "C": (94.80, 1 - 0.489), "D": (94.00, 1 - 0.641),
                "E": (91.90, 1 - 0.826)}
PAPER_MOBILENETS = {"0.4x": (92.56, 1 - 0.587), "1.0x": (94.44, 1.0), "1.4x": (95.08, 1.402)}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks, ties averaged)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator else 0.0


class Served:
    """One bundle under the service's executor: batched accuracy, batch-1 timing."""

    def __init__(self, path: Path, fused: bool):
        self.bundle = load_bundle(path)
        self.manifest = self.bundle.manifest
        self.costs = architecture.CostTable.of_manifest(self.manifest)
        self.cache = None
        if fused:
            # builds only when asked (`warm`): nothing compiles in the background while timing
            self.cache = FusedCache(self.bundle, size=64, min_count=10**9, builds_per_minute=1e9)
            self.cache.start()
        self.executor = Executor(self.bundle, fused=self.cache)

    def warm(self, codes: list[str]) -> None:
        if self.cache is not None:
            self.cache.warm(codes)
            self.cache.wait_idle(600)

    def run(self, x: np.ndarray, point: str | None = None, executed: np.ndarray | None = None, batch: int = 500):
        """(logits, executed) of every row, in batches."""
        logits, chosen, _ = self.run_traced(x, point, executed, batch)
        return logits, chosen

    def run_traced(self, x: np.ndarray, point: str | None = None, executed: np.ndarray | None = None,
                   batch: int = 500):
        """(logits, executed, traces) of every row, in batches; traces: how a cascade point answered
        each row (service.cascade.Trace), None for other points."""
        logits, chosen, traces = [], [], []
        for i in range(0, len(x), batch):
            result = self.executor.run(x[i : i + batch], None if executed is None else executed[i : i + batch], point)
            logits.append(result.logits)
            chosen.append(result.executed)
            traces += result.traces if result.traces is not None else [None] * len(result.logits)
        return np.concatenate(logits), np.concatenate(chosen), traces

    def warm_cascades(self) -> None:
        """Compile every cascade stage's graph (a server warms them at start-up: service/state.py)."""
        if self.cache is not None:
            for runner in self.executor.cascades.values():
                for stage in runner.stages:
                    self.cache.warm([stage.code], stage.network)
            self.cache.wait_idle(600)

    def call(self, x: np.ndarray, point: str | None = None, executed: np.ndarray | None = None):
        """`i -> Executor.run` on row i of `x` alone (batch 1), for `time_in_rounds`."""
        return lambda i: self.executor.run(x[i : i + 1], None if executed is None else executed[i : i + 1], point)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.stop()


def time_in_rounds(calls: dict[str, object], rows: int, rounds: int = 10, warmup: int = 10) -> dict[str, dict]:
    """Batch-1 milliseconds (mean, p50, p99) of every call on rows 0..rows-1. The rows are cut into
    `rounds` slices; in each round every model runs its slice back to back (after `warmup` untimed
    calls), models in turn. So each model is timed with its own weights in the caches, as a server
    serving it has them, while drift on the machine weighs on every model alike. (Alternating
    models on every row instead evicts each model's weights between its calls: measured, a static
    MobileNetV2 bundle read 0.84 ms that way against 0.35 ms alone, because the dynamic bundle's
    points share blocks and stayed warm while the baseline's did not.)"""
    names = list(calls)
    times = {name: np.empty(rows) for name in names}
    for chunk in np.array_split(np.arange(rows), max(1, min(rounds, rows))):
        for name in names:
            for i in chunk[:warmup]:
                calls[name](int(i))
            for i in chunk:
                t0 = time.perf_counter()
                calls[name](int(i))
                times[name][i] = (time.perf_counter() - t0) * 1e3
    return {name: {"mean_ms": float(t.mean()), "p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99))}
            for name, t in times.items()}


def _inputs(ctx: Context, manifest) -> np.ndarray:
    pre = manifest.preprocessing
    return np.stack([imaging.to_input(pixels, pre) for pixels in ctx.test.images])


def _loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]


def static_twin_candidates(ctx: Context, frequent: list[str], costs, target_ms: float, keep: int = 5) -> list[str]:
    """A point's most frequent architectures, and MobileNetV2 paths with skippable cells skipped
    (from the last cell, or from the first) whose estimate is closest to `target_ms`."""
    space = ctx.space
    out = list(dict.fromkeys(frequent[:keep]))
    skippable = [c.index for c in space.cells if c.skippable]
    for order in (skippable[::-1], skippable):
        best, best_gap = None, None
        for k in range(len(order) + 1):
            matrix = architecture.mobilenet_v2(space)
            matrix[order[:k]] = False
            executed = architecture.apply_empty_cell_rule(matrix[None], space)
            gap = abs(float(costs.latency_ms(executed)[0]) - target_ms)
            if best_gap is None or gap < best_gap:
                best, best_gap = architecture.encode(executed[0]), gap
        if best not in out:
            out.append(best)
    return out


def best_static_twin(ctx: Context, metagraph, candidates: list[str]) -> dict:
    """The candidate most accurate on validation with its own re-estimated batch norm; its
    test correctness per image (PyTorch, the bundle's weights otherwise)."""
    space = ctx.space
    results = []
    for code in candidates:
        matrix = architecture.decode(code, space.num_cells, space.num_modules)
        model = copy.deepcopy(metagraph)
        policy = fixed_policy(matrix)
        reestimate(model, ctx.batches("train", seed=8000), lambda x: model.forward_selected(
            ctx.to_device(x), policy(ctx.to_device(x))), ctx.config.finetune.bn_images)
        results.append((evaluate(model, ctx.batches("val"), policy)["top1"], code, model))
    val_top1, code, model = max(results, key=lambda r: r[0])
    matrix = architecture.decode(code, space.num_cells, space.num_modules)
    correct = []
    with torch.no_grad():
        for x, y in ctx.batches("test"):
            x = ctx.to_device(x)
            correct.append((model.forward_selected(x, fixed_policy(matrix)(x)).argmax(1).cpu() == y).numpy())
    return {"code": code, "val_top1": val_top1, "candidates": {c: v for v, c, _ in results},
            "correct": np.concatenate(correct)}


def run(ctx: Context, bundle: str | None = None, baseline_bundle: str | None = None, out: str | None = None) -> dict:
    bundle_path = Path(bundle) if bundle else ctx.run.path / "bundle"
    baseline_path = Path(baseline_bundle) if baseline_bundle else static_twin_folder(bundle_path)
    out_dir = Path(out) if out else ctx.run.path / "report"
    for path in (bundle_path, baseline_path):
        if not (path / "manifest.json").exists():
            raise RunError(f"no bundle at {path}; run the export phase first")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ctx.config.report
    labels = ctx.test.labels
    rng = np.random.default_rng(ctx.config.seed)
    timed = np.sort(rng.permutation(len(labels))[: cfg.latency_images])

    dynamic = {fused: Served(bundle_path, fused) for fused in (False, True)}
    static = {fused: Served(baseline_path, fused) for fused in (False, True)}
    manifest = dynamic[False].manifest
    x = _inputs(ctx, manifest)
    report: dict = {"images": int(len(labels)), "latency_images": int(len(timed)), "points": {}, "controls": {}}

    # the baseline: accuracy, loss per image (difficulty), latency both ways
    base_logits, base_executed = static[False].run(x)
    base_correct = base_logits.argmax(1) == labels
    difficulty = _loss(base_logits, labels)
    static[True].warm([static[False].manifest.fixed_architecture])
    xt = x[timed]
    calls = {"baseline/per_block": static[False].call(xt), "baseline/fused": static[True].call(xt)}
    report["baseline"] = {"top1": float(base_correct.mean()),
                          "mflops": float(static[False].costs.mflops(base_executed[:1])[0]),
                          "curve": _baseline_curve(ctx)}

    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(ctx.run.require("finetune")["model"])
    metagraph.eval()
    points = [c.name for c in manifest.controllers]  # the search's points the export serves (training/controls.py)
    if manifest.training.get("controller_controls"):
        report["controller_controls"] = manifest.training["controller_controls"]
    dynamic[True].warm([a.code for a in manifest.frequent_architectures])
    per_image = {}
    for point in points:
        logits, executed = dynamic[False].run(x, point)
        correct = logits.argmax(1) == labels
        estimated = dynamic[False].costs.latency_ms(executed, point)
        codes = architecture.encode_many(executed)
        counts: dict[str, int] = {}
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
        frequent = [c for c, _ in sorted(counts.items(), key=lambda t: -t[1])]
        calls[f"{point}/per_block"] = dynamic[False].call(xt, point)
        calls[f"{point}/fused"] = dynamic[True].call(xt, point)
        report["points"][point] = {
            "top1": float(correct.mean()),
            "estimated_latency_ms": float(estimated.mean()),
            "mflops": float(dynamic[False].costs.mflops(executed, point).mean()),
            "modules": float(executed.sum((1, 2)).mean()), "architectures": len(counts),
            "most_frequent": {c: counts[c] for c in frequent[:5]},
            "difficulty_spearman": spearman(estimated, difficulty),
            "vs_baseline": bootstrap_difference(correct, base_correct, cfg.resamples, ctx.config.seed),
        }
        per_image[point] = {"correct": correct, "executed": executed, "estimated": estimated}

        # control 1: the same architectures, assigned to images at random
        shuffled = executed[rng.permutation(len(executed))]
        s_logits, _ = dynamic[False].run(x, executed=shuffled)
        s_correct = s_logits.argmax(1) == labels
        # control 2: the best static twin
        twin = best_static_twin(ctx, metagraph, static_twin_candidates(
            ctx, frequent, dynamic[False].costs, float(estimated.mean()), cfg.twin_candidates))
        twin_matrix = architecture.decode(twin["code"], ctx.space.num_cells, ctx.space.num_modules)
        twin_given = np.broadcast_to(twin_matrix, (len(timed), *twin_matrix.shape))
        calls[f"{point}/shuffled"] = dynamic[False].call(xt, executed=shuffled[timed])
        calls[f"{point}/static_twin"] = dynamic[False].call(xt, executed=twin_given)
        calls[f"{point}/shuffled/fused"] = dynamic[True].call(xt, executed=shuffled[timed])
        calls[f"{point}/static_twin/fused"] = dynamic[True].call(xt, executed=twin_given)
        report["controls"][point] = {
            "shuffled": {"top1": float(s_correct.mean()),
                         "point_minus_control": bootstrap_difference(correct, s_correct, cfg.resamples, ctx.config.seed)},
            "static_twin": {"code": twin["code"], "val_top1": twin["val_top1"], "candidates": twin["candidates"],
                            "top1": float(twin["correct"].mean()),
                            "point_minus_control": bootstrap_difference(correct, twin["correct"], cfg.resamples,
                                                                        ctx.config.seed)},
        }
        print(f"report {point}: top1={correct.mean():.4f}, shuffled {s_correct.mean():.4f}, "
              f"static twin {twin['correct'].mean():.4f}", flush=True)

    for point in manifest.cascades:
        entry, control, per_image[point.name] = cascade_figures(ctx, dynamic[False], point.name, x, labels, base_correct,
                                                                difficulty, rng)
        report["points"][point.name], report["controls"][point.name] = entry, control
        calls[f"{point.name}/per_block"] = dynamic[False].call(xt, point.name)
        calls[f"{point.name}/fused"] = dynamic[True].call(xt, point.name)
        for stage in dynamic[False].executor.cascades[point.name].stages:
            calls.setdefault(f"stage/per_block/{stage.network}/{stage.code}", _stage_call(stage, xt))
        print(f"report {point.name}: top1={entry['top1']:.4f}, escalated {entry['escalated']:.3f}, random escalation "
              f"{control['shuffled']['top1']:.4f}", flush=True)
    dynamic[True].warm_cascades()
    for runner in dynamic[True].executor.cascades.values():  # each stage alone, fused, as the cascade runs it
        for stage in runner.stages:
            calls.setdefault(f"stage/{stage.network}/{stage.code}", (lambda st: lambda i: st.logits(xt[i : i + 1]))(stage))
    adapted = coadapt.load(ctx)
    if adapted and manifest.cascades:
        report["coadaptation"] = coadaptation(ctx, adapted, manifest.cascades, per_image, labels)
    if manifest.training.get("first_stages"):  # what the export tried as first stages, on validation
        report["first_stages"] = manifest.training["first_stages"]
        report["first_stage_of"] = {c.name: c.stages[0].network for c in manifest.cascades}
        report["multires"] = (ctx.run.load("multires") or {}).get("figures")
        report["shared_twins"] = (ctx.run.load("shared_twins") or {}).get("figures")

    # a warm server: the timed images' most frequent architectures compiled before timing starts
    counts: dict[str, int] = {}
    for p in per_image.values():
        for code in architecture.encode_many(p["executed"][timed]):
            counts[code] = counts.get(code, 0) + 1
    twins = [c["static_twin"]["code"] for c in report["controls"].values() if "static_twin" in c]  # controller points
    dynamic[True].warm([code for code, _ in sorted(counts.items(), key=lambda t: -t[1])] + twins)
    # every model and control timed in one pass, in rounds
    timing = time_in_rounds(calls, len(timed))
    cascade_runners = dynamic[True].executor.cascades
    for served in (*dynamic.values(), *static.values()):
        served.close()
    report["baseline"]["latency"] = {"per_block": timing["baseline/per_block"], "fused": timing["baseline/fused"]}
    base_ms, base_fused_ms = timing["baseline/per_block"]["mean_ms"], timing["baseline/fused"]["mean_ms"]
    for point, p in report["points"].items():
        p["latency"] = {"per_block": timing[f"{point}/per_block"], "fused": timing[f"{point}/fused"]}
        p["relative_to_baseline"] = p["latency"]["per_block"]["mean_ms"] / base_ms
        p["relative_to_baseline_fused"] = p["latency"]["fused"]["mean_ms"] / base_fused_ms
        if p.get("oracle"):
            runner = cascade_runners[point]
            p["oracle"] = oracle_share(p["oracle"], [timing[f"stage/{st.network}/{st.code}"]["mean_ms"]
                                                     for st in runner.stages],
                                       p["latency"]["fused"]["mean_ms"], base_fused_ms)
        if point in cascade_runners:
            stages = cascade_runners[point].stages
            twin = cascade_static_twin(ctx, cascade_runners[point], per_image[point],
                                       [timing[f"stage/{st.network}/{st.code}"] for st in stages],
                                       p["latency"]["fused"]["mean_ms"])
            st = stages[twin["stage"]]
            twin["latency"] = {"per_block": timing[f"stage/per_block/{st.network}/{st.code}"],
                               "fused": timing[f"stage/{st.network}/{st.code}"]}
            report["controls"][point]["static_twin"] = twin
            print(f"report {point}: best static {twin['code']} {twin['top1']:.4f} "
                  f"({twin['latency']['fused']['mean_ms']:.3f} ms fused)", flush=True)
            # its shuffled control runs its stages as often as it does: the same cost
            report["controls"][point]["shuffled"]["latency"] = {"per_block": timing[f"{point}/per_block"],
                                                                "fused": timing[f"{point}/fused"]}
        else:
            for kind in ("shuffled", "static_twin"):
                report["controls"][point][kind]["latency"] = {"per_block": timing[f"{point}/{kind}"],
                                                              "fused": timing[f"{point}/{kind}/fused"]}
        print(f"report {point}: {p['latency']['per_block']['mean_ms']:.3f} ms per block "
              f"({p['relative_to_baseline']:.2f}x baseline), {p['latency']['fused']['mean_ms']:.3f} ms fused "
              f"({p['relative_to_baseline_fused']:.2f}x)", flush=True)

    report["machine"] = manifest.profile.machine
    write_atomic(out_dir / "report.json", json.dumps(report, indent=1).encode())
    write_atomic(out_dir / "FRONTIER.md", frontier_table(report).encode())
    plots(report, ctx, per_image, difficulty, out_dir, manifest.default_controller, cascade_runners)
    ctx.run.log("report", folder=str(out_dir), **{f"{p}_top1": v["top1"] for p, v in report["points"].items()})
    return report


def cascade_figures(ctx: Context, served: Served, point: str, x: np.ndarray, labels: np.ndarray,
                    base_correct: np.ndarray, difficulty: np.ndarray, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """A cascade point's figures on the test split, and its controls: the same escalations dealt to
    images at random (the same stages run as often, so the same mean cost), and the best static
    network among its stages that costs no more than the point (its stages' own architectures,
    chosen on validation)."""
    cfg = ctx.config.report
    logits, executed, traces = served.run_traced(x, point)
    correct = logits.argmax(1) == labels
    answered = np.array([t.answered for t in traces])
    estimated = np.array([t.estimated_ms for t in traces])
    runner = served.executor.cascades[point]
    own = [_stage_logits(stage, x) for stage in runner.stages]
    stage_correct = np.stack([out.argmax(1) == labels for out in own])  # each stage's network alone
    chained = [own[0]]  # each stage's answer as the cascade gives it, blends included
    for stage, out in zip(runner.stages[1:], own[1:]):
        chained.append(blend(out, chained[-1], stage.blend))
    answer_correct = np.stack([out.argmax(1) == labels for out in chained])
    shuffled = rng.permutation(answered)
    s_correct = answer_correct[shuffled, np.arange(len(labels))]
    val_x = np.stack([imaging.to_input(pixels, served.manifest.preprocessing) for pixels in ctx.val.images])
    val_top1 = [float((_stage_logits(stage, val_x).argmax(1) == ctx.val.labels).mean()) for stage in runner.stages]
    resolutions = {str(r): int(n) for r, n in zip(*np.unique([t.stage.resolution for t in traces], return_counts=True))}
    entry = {
        "top1": float(correct.mean()), "estimated_latency_ms": float(estimated.mean()),
        "mflops": float(np.mean([t.mflops for t in traces])), "modules": float(executed.sum((1, 2)).mean()),
        "architectures": int(len(np.unique(answered))), "escalated": float((answered > 0).mean()),
        "resolutions": resolutions,
        "most_frequent": {f"{runner.stages[s].network}/{runner.stages[s].code}": int((answered == s).sum())
                          for s in np.unique(answered)},
        "difficulty_spearman": spearman(estimated, difficulty),
        "vs_baseline": bootstrap_difference(correct, base_correct, cfg.resamples, ctx.config.seed),
        "oracle": cascade_oracle(answer_correct, float(correct.mean())),
    }
    control = {
        "shuffled": {"top1": float(s_correct.mean()), "escalated": float((shuffled > 0).mean()),
                     "point_minus_control": bootstrap_difference(correct, s_correct, cfg.resamples, ctx.config.seed)},
    }
    return entry, control, {"correct": correct, "executed": executed, "estimated": estimated, "answered": answered,
                            "first": own[0], "stage_correct": stage_correct, "stage_val_top1": val_top1}


def cascade_static_twin(ctx: Context, runner, per_image: dict, stage_ms: list[dict], point_ms: float) -> dict:
    """A cascade's static-twin control: of its stages' networks alone, the most accurate on validation
    among those whose measured mean latency (`stage_ms`: each stage alone, fused cache, batch 1, timed
    in the same rounds as the point) is no more than the point's (`point_ms`, fused); the cheapest
    stage where none is. Latency decides as served (the fused cache is the server's default path),
    not by the manifest's per-block estimates, by which a cascade costs more than its last stage."""
    cfg = ctx.config.report
    affordable = [s for s, ms in enumerate(stage_ms) if ms["mean_ms"] <= point_ms]
    cheapest = min(range(len(stage_ms)), key=lambda s: stage_ms[s]["mean_ms"])
    best = max(affordable or [cheapest], key=lambda s: per_image["stage_val_top1"][s])
    stage, correct = runner.stages[best], per_image["stage_correct"][best]
    return {"code": f"{stage.network}/{stage.code}", "stage": best, "resolution": stage.resolution,
            "val_top1": per_image["stage_val_top1"][best], "estimated_latency_ms": stage.estimated_ms,
            "top1": float(correct.mean()),
            "point_minus_control": bootstrap_difference(per_image["correct"], correct, cfg.resamples, ctx.config.seed)}


def cascade_oracle(answer_correct: np.ndarray, top1: float) -> dict | None:
    """The cheapest per-image choice between a two-stage cascade's answers (`answer_correct`: each
    stage's, as the cascade gives it, on every image) that reaches `top1`: it escalates only images
    the first stage gets wrong and the last right, and only as many as it needs. None for other cascades."""
    if len(answer_correct) != 2:
        return None
    n = answer_correct.shape[1]
    first = int(answer_correct[0].sum())
    fixable = int((~answer_correct[0] & answer_correct[1]).sum())
    escalated = min(max(int(np.ceil(round(top1 * n - first, 6))), 0), fixable)
    return {"top1": (first + escalated) / n, "escalated": escalated / n}


def oracle_share(oracle: dict, stage_ms: list[float], point_ms: float, baseline_ms: float) -> dict:
    """`oracle` (cascade_oracle) priced with its stages' measured latencies alone (`stage_ms`), and the
    share of its saving over the baseline (`baseline_ms`) that the point (`point_ms`) has."""
    ms = stage_ms[0] + oracle["escalated"] * stage_ms[1]
    return {**oracle, "fused_ms": ms,
            "gap_recovered": (baseline_ms - point_ms) / (baseline_ms - ms) if baseline_ms > ms else None}


def coadaptation(ctx: Context, adapted: dict, cascades: list, per_image: dict, labels: np.ndarray) -> dict:
    """Each two-stage cascade at its own threshold (the same images escalate: the same cost) with
    each full-resolution network as its last stage: the baseline, its copy fine-tuned on the images
    the first stage escalates (`coadapted`) and the copy fine-tuned on as many random images
    (`shuffled`, the control); the co-adapted one against each by a paired bootstrap."""
    cfg = ctx.config.report
    last = {"baseline": baseline_phase.load(ctx), **adapted}
    logits = {name: coadapt.predict(model, ctx.batches("test")) for name, model in last.items()}
    out = {}
    for point in cascades:
        if len(point.stages) != 2:
            continue
        p = per_image[point.name]
        escalated = (p["answered"] > 0)[:, None]
        correct = {name: np.where(escalated, blend(own, p["first"], point.stages[-1].blend), p["first"]).argmax(1)
                   == labels for name, own in logits.items()}
        out[point.name] = {"escalated": float(escalated.mean()), "network": point.stages[-1].network,
                           "top1": {name: float(c.mean()) for name, c in correct.items()},
                           **{f"coadapted_minus_{name}": bootstrap_difference(correct["coadapted"], correct[name],
                                                                              cfg.resamples, ctx.config.seed)
                              for name in ("shuffled", "baseline")}}
        print(f"report {point.name}: last stage baseline {out[point.name]['top1']['baseline']:.4f}, co-adapted "
              f"{out[point.name]['top1']['coadapted']:.4f}, shuffled routes {out[point.name]['top1']['shuffled']:.4f}",
              flush=True)
    return out


def _stage_call(stage, x: np.ndarray):
    """`i -> ` a cascade stage's network alone on row i (batch 1), for `time_in_rounds`."""
    return lambda i: stage.executor.backbone(pool(x[i : i + 1], stage.resolution), stage.executed[None])


def _stage_logits(stage, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """A cascade stage's network alone on every row (its architecture, the input pooled to its resolution)."""
    out = []
    for i in range(0, len(x), batch):
        rows = pool(x[i : i + batch], stage.resolution)
        out.append(stage.executor.per_block(rows, np.broadcast_to(stage.executed, (len(rows), *stage.executed.shape))))
    return np.concatenate(out)


def _baseline_curve(ctx: Context) -> list[dict]:
    state = ctx.run.load("baseline")
    return [] if state is None else [{k: c[k] for k in ("epoch", "val_top1", "elapsed_s") if k in c}
                                     for c in state["curve"]]


def frontier_table(report: dict) -> str:
    base = report["baseline"]
    lines = ["| model | top-1 | latency ms (per-block) | x baseline | latency ms (fused cache) | x baseline | MFLOPs | "
             "modules | architectures |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bl = base["latency"]
    lines.append(f"| MobileNetV2 baseline | {base['top1']:.4f} | {bl['per_block']['mean_ms']:.3f} | 1.00 | "
                 f"{bl['fused']['mean_ms']:.3f} | 1.00 | {base['mflops']:.2f} | 17 | 1 |")
    for name, p in report["points"].items():
        lat = p["latency"]
        if "escalated" in p:
            name = f"{name} (cascade, {p['escalated'] * 100:.1f}% escalated)"
        lines.append(f"| {name} | {p['top1']:.4f} | {lat['per_block']['mean_ms']:.3f} | {p['relative_to_baseline']:.2f} | "
                     f"{lat['fused']['mean_ms']:.3f} | {p['relative_to_baseline_fused']:.2f} | {p['mflops']:.2f} | "
                     f"{p['modules']:.1f} | {p['architectures']} |")
    lines += ["", "Controls (accuracy difference, point minus control, paired bootstrap 95% interval). For a cascade, "
              "\"shuffled\" deals its escalations to images at random (the same stages run as often), and its "
              "static twin is the best of its stages' networks alone (on validation) that costs no more than it, both "
              "measured through the fused cache, as served:", "",
              "| point | shuffled top-1 | point - shuffled | static twin | twin top-1 | point - twin | "
              "rank corr. latency vs difficulty | point - baseline |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ci(d: dict) -> str:
        return f"{d['difference'] * 100:+.2f} pts [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]"

    for name, c in report["controls"].items():
        p = report["points"][name]
        lines.append(f"| {name} | {c['shuffled']['top1']:.4f} | {ci(c['shuffled']['point_minus_control'])} | "
                     f"`{c['static_twin']['code']}` | {c['static_twin']['top1']:.4f} | "
                     f"{ci(c['static_twin']['point_minus_control'])} | {p['difficulty_spearman']:+.3f} | "
                     f"{ci(p['vs_baseline'])} |")
    checked = {name: c for name, c in report.get("controller_controls", {}).items() if c["architectures"] > 1}
    if checked:
        lines += ["", "Controller points that run several architectures, on the validation split, against their routes "
                  "shuffled across images (the export serves one only where the interval is above zero):", "",
                  "| point | architectures | top-1 | shuffled top-1 | point - shuffled | served |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, c in checked.items():
            lines.append(f"| {name} | {c['architectures']} | {c['top1']:.4f} | {c['shuffled_top1']:.4f} | "
                         f"{ci(c['point_minus_shuffled'])} | {'yes' if c['served'] else 'no'} |")
    oracles = {name: p["oracle"] for name, p in report["points"].items() if p.get("oracle")}
    if oracles:
        lines += ["", "Each cascade against its oracle: the cheapest choice, image by image, between its two answers "
                  "that is as accurate on these images (it escalates only images the first stage gets wrong and the "
                  "last right), priced with its stages timed alone (fused cache, batch 1); the share is how much of "
                  "the oracle's saving over the baseline the point has:", "",
                  "| point | escalated | oracle escalated | fused ms | oracle fused ms | share of the oracle's saving |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, o in oracles.items():
            p = report["points"][name]
            share = "" if o.get("gap_recovered") is None else f"{o['gap_recovered']:.2f}"
            lines.append(f"| {name} | {p['escalated'] * 100:.1f}% | {o['escalated'] * 100:.1f}% | "
                         f"{p['latency']['fused']['mean_ms']:.3f} | {o['fused_ms']:.3f} | {share} |")
    if report.get("coadaptation"):
        lines += ["", "Co-adaptation (phase `coadapt`): each cascade at its own threshold, so the same images escalate "
                  "at the same cost, with each full-resolution network as its last stage: the baseline, its copy "
                  "fine-tuned on the images the first stage escalates, and the copy fine-tuned as long on random "
                  "images (the control):", "",
                  "| point | escalated | its last stage | baseline | co-adapted | control | co-adapted - control | "
                  "co-adapted - baseline |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, c in report["coadaptation"].items():
            lines.append(f"| {name} | {c['escalated'] * 100:.1f}% | `{c['network']}` | {c['top1']['baseline']:.4f} | "
                         f"{c['top1']['coadapted']:.4f} | {c['top1']['shuffled']:.4f} | "
                         f"{ci(c['coadapted_minus_shuffled'])} | {ci(c['coadapted_minus_baseline'])} |")
    if report.get("first_stages"):
        lines += ["", "First stages the export tried (validation split; latency as the manifest's cost model estimates "
                  "it): the baseline's twin and, with phase `multires`, architectures of the multi-resolution "
                  "meta-graph at a lower resolution, each named `<architecture>@<resolution>`:", "",
                  "| first stage | validation top-1 | estimated ms | MFLOPs | used by |", "| --- | --- | --- | --- | --- |"]
        used: dict[str, list[str]] = {}
        for point, first in report.get("first_stage_of", {}).items():
            used.setdefault(first, []).append(point)
        for name, f in report["first_stages"].items():
            lines.append(f"| `{name}` | {f['top1']:.4f} | {f['latency_ms']:.4f} | {f['mflops']:.2f} | "
                         f"{', '.join(used.get(name, [])) or '-'} |")
        if report.get("multires"):
            lines += _side_by_side(
                "Batch norms of the multi-resolution meta-graph at each lower resolution (validation top-1, "
                "statistics re-estimated on the path at that resolution): the resolution's own (switchable) "
                "against the full resolution's:", ("path", "own", "full resolution's"), report["multires"],
                "own", "shared", lambda path: path)
    if report.get("shared_twins"):
        lines += _side_by_side(
            "The baseline trained at every resolution at once (phase `shared_twins`: one set of convolutions, "
            "batch norms per resolution) against a network of its own at each (the twin below the input size, "
            "the baseline at it), validation top-1:", ("resolution", "shared", "separate"), report["shared_twins"],
            "shared", "separate", lambda r: f"{r}x{r}")
    return "\n".join(lines) + "\n"


def _side_by_side(intro: str, header: tuple[str, str, str], figures: dict, first: str, second: str,
                  name) -> list[str]:
    """A table of every pair of figures `val_top1_<what>_<first>` and `val_top1_<what>_<second>`,
    a row each: `name(what)`, then both figures."""
    prefix, end = "val_top1_", f"_{first}"
    lines = ["", intro, "", "| " + " | ".join(header) + " |", "| --- | --- | --- |"]
    for key, value in figures.items():
        if key.startswith(prefix) and key.endswith(end):
            other = figures[key[: -len(end)] + f"_{second}"]
            lines.append(f"| {name(key[len(prefix):-len(end)])} | {value:.4f} | {other:.4f} |")
    return lines


def plots(report: dict, ctx: Context, per_image: dict, difficulty: np.ndarray, out_dir: Path,
          default: str | None = None, cascades: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    base = report["baseline"]
    base_ms = base["latency"]["fused"]["mean_ms"]  # as served: the fused cache is the server's default path
    fig, ax = plt.subplots(figsize=(7.5, 5))
    names = list(report["points"])
    for series, color, label in ((lambda n: n not in (cascades or {}), "tab:blue", "controller points (this run)"),
                                 (lambda n: n in (cascades or {}), "tab:green", "cascade points (this run)")):
        kept = sorted((n for n in names if series(n)), key=lambda n: report["points"][n]["relative_to_baseline_fused"])
        xs = [report["points"][n]["relative_to_baseline_fused"] for n in kept]
        ys = [report["points"][n]["top1"] * 100 for n in kept]
        if kept:
            ax.plot(xs, ys, "o-", color=color, label=label)
        for n, xv, yv in zip(kept, xs, ys):
            ax.annotate(n, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for kind, marker, color in (("shuffled", "x", "tab:red"), ("static_twin", "s", "tab:orange")):
        cx = [report["controls"][n][kind]["latency"]["fused"]["mean_ms"] / base_ms for n in names]
        cy = [report["controls"][n][kind]["top1"] * 100 for n in names]
        ax.scatter(cx, cy, marker=marker, color=color, label=f"control: {kind.replace('_', ' ')}")
    ax.scatter([1.0], [base["top1"] * 100], marker="*", s=160, color="black", label="MobileNetV2, same width")
    ax.set_xlabel("mean latency per image / MobileNetV2 baseline's (service executor, fused cache, batch 1)")
    ax.set_ylabel(f"top-1 %, test split ({report['images']:,} images)")
    ax2 = ax.twinx()
    ax2.plot([v[1] for v in PAPER_POINTS.values()], [v[0] for v in PAPER_POINTS.values()], "^--", color="gray",
             alpha=0.6, label="paper InstaNAS-C10 A-E (other scale)")
    ax2.scatter([v[1] for v in PAPER_MOBILENETS.values()], [v[0] for v in PAPER_MOBILENETS.values()], marker="v",
                color="gray", alpha=0.6, label="paper MobileNetV2 0.4/1.0/1.4x")
    ax2.set_ylabel("paper top-1 % (full CIFAR-10, GPU-trained; reference only)", color="gray")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
    ax.set_title("Accuracy / latency frontier")
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=120)
    plt.close(fig)

    curve = base["curve"]
    if curve:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        a1.plot([c["epoch"] for c in curve], [c["val_top1"] * 100 for c in curve], "o-", ms=3)
        a1.set_xlabel("epoch")
        a1.set_ylabel("validation top-1 %")
        a2.plot([c["elapsed_s"] / 3600 for c in curve], [c["val_top1"] * 100 for c in curve], "o-", ms=3)
        a2.set_xlabel("training wall-clock (h, 2 CPU cores)")
        fig.suptitle("MobileNetV2 baseline: learning curve")
        fig.tight_layout()
        fig.savefig(out_dir / "learning_curve.png", dpi=120)
        plt.close(fig)

    # the default point's easiest and hardest images, and what ran for each
    point = default if default in per_image else (names[len(names) // 2] if names else None)
    if point is None:
        return
    if cascades and point in cascades:
        _cascade_difficulty(ctx, cascades[point], per_image[point], out_dir)
        return
    estimated, executed = per_image[point]["estimated"], per_image[point]["executed"]
    order = np.argsort(estimated, kind="stable")
    picks = [("cheapest", order[:6]), ("costliest", order[::-1][:6])]
    fig, axes = plt.subplots(4, 6, figsize=(10, 6.5))
    for r, (title, idx) in enumerate(picks):
        for c, i in enumerate(idx):
            img_ax, arch_ax = axes[2 * r, c], axes[2 * r + 1, c]
            img_ax.imshow(ctx.test.images[i])
            img_ax.set_title(f"{ctx.test.classes[ctx.test.labels[i]]}\n{estimated[i]:.2f} ms, loss {difficulty[i]:.2f}",
                             fontsize=7)
            arch_ax.imshow(executed[i].T, cmap="Greys", vmin=0, vmax=1, aspect="auto")
            arch_ax.set_xlabel("cell", fontsize=6)
            for a in (img_ax, arch_ax):
                a.set_xticks([])
                a.set_yticks([])
        axes[2 * r, 0].set_ylabel(title, fontsize=9)
    fig.suptitle(f"Operating point {point}: the images given the cheapest and the costliest architectures "
                 f"(grid: modules x cells, black = ran)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "difficulty.png", dpi=110)
    plt.close(fig)


def _cascade_difficulty(ctx: Context, runner, images: dict, out_dir: Path, count: int = 8) -> None:
    """A cascade's easiest and hardest test images: those its first stage is surest about (answered
    there) and least sure about (escalated), each with what ran and whether the answer was right."""
    from matplotlib import pyplot as plt

    first = runner.stages[0]
    sure = confidence(first.confidence, images["first"], first.gate)
    order = np.argsort(-sure, kind="stable")
    picks = [("easiest", order[:count]), ("hardest", order[::-1][:count])]
    fig, axes = plt.subplots(2, count, figsize=(1.45 * count, 4.2))
    for r, (title, idx) in enumerate(picks):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(ctx.test.images[i])
            ran = " + ".join(f"{runner.stages[s].resolution}" for s in range(images["answered"][i] + 1))
            ax.set_title(f"{ctx.test.classes[ctx.test.labels[i]]}, {'right' if images['correct'][i] else 'wrong'}\n"
                         f"{first.confidence.replace('_', ' ')} {sure[i]:.2f}\nran {ran}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=9)
    fig.suptitle(f"Operating point {runner.name}: the test images its {first.resolution}x{first.resolution} stage is "
                 f"surest and least sure about, and the resolutions that ran", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "difficulty.png", dpi=110)
    plt.close(fig)
