"""Upper bound on any per-image controller over a bundle's meta-graph: the oracle router.

Candidates: every architecture any operating point chooses on the images, the manifest's frequent
architectures, the MobileNetV2 path (module 0 everywhere), all modules, and the cheapest path.
Each runs on every image with its architecture forced, giving per-image correctness. The oracle
lets each image take any candidate; for a mean-latency budget its best top-1 is a multiple-choice
knapsack, solved by a Lagrangian sweep (per lambda, each image takes the candidate maximising
correct - lambda * cost): the upper hull, interpolated between hull points (exact to within one
image, since every image's gain is 0 or 1). Costs, each relative to the static MobileNetV2
baseline bundle: CostTable estimates (its `baseline_ms`), and batch-1 executor milliseconds
measured like FRONTIER.md's two columns (`training.report.time_in_rounds`, baseline bundle
included): the per-block executor, and each architecture as one fused graph (what the service's
fused cache serves); each with the default point's controller charged to every image, and without.

    .venv/bin/python scripts/oracle_router.py --model models/cifar10-default \
        --data ../shared/data/cifar10-jpeg/test.tar.gz [--limit 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluate_bundle import read_split  # noqa: E402  (scripts/, this file's folder)

from service import architecture, imaging  # noqa: E402
from service.bundle import load_bundle  # noqa: E402
from service.executor import Executor  # noqa: E402
from service.fused import GraphLibrary, build  # noqa: E402
from service.manifest import static_twin_folder  # noqa: E402
from training.report import time_in_rounds  # noqa: E402

RATIOS = (0.6, 0.7, 0.8, 0.9, 1.0)
BATCH = 100  # small batches: onnxruntime keeps an arena per session sized to the largest batch


def predict(executor: Executor, x: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
    """Top-1 class of every row, in batches; `matrix` forces one architecture (None: the bundle's own)."""
    out = []
    for i in range(0, len(x), BATCH):
        chunk = x[i : i + BATCH]
        given = None if matrix is None else np.broadcast_to(matrix, (len(chunk), *matrix.shape))
        out.append(executor.run(chunk, given).logits.argmax(1))
    return np.concatenate(out)


def oracle_hull(correct: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean cost, top-1) at every lambda between the breakpoints 1 / (cost_j - cost_k)."""
    gaps = np.unique((cost[:, None] - cost[None, :])[cost[:, None] > cost[None, :]])
    breaks = np.sort(1.0 / gaps)
    lambdas = np.concatenate([[breaks[0] / 2], (breaks[1:] + breaks[:-1]) / 2, [breaks[-1] * 2]])
    points = set()
    for lam in lambdas:
        pick = (correct - lam * cost[None, :]).argmax(1)
        points.add((float(cost[pick].mean()), float(correct[np.arange(len(pick)), pick].mean())))
    hull = sorted(points)
    return np.array([c for c, _ in hull]), np.array([a for _, a in hull])


def oracle_figures(correct: np.ndarray, cost: np.ndarray, baseline_ms: float, target: float) -> dict:
    hull_cost, hull_top1 = oracle_hull(correct, cost)
    ratio = hull_cost / baseline_ms
    at = {f"{r:.1f}": (float(np.interp(r, ratio, hull_top1)) if r >= ratio[0] else None) for r in RATIOS}
    reach = float(np.interp(target, hull_top1, ratio)) if target <= hull_top1[-1] else None
    return {"top1_at_ratio": at, "ratio_to_reach_baseline_top1": reach,
            "hull": [[float(c), float(a)] for c, a in zip(ratio, hull_top1)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline", default=None, help="static MobileNetV2 bundle (default: <model>-mobilenet_v2)")
    parser.add_argument("--data", required=True, help="a tar(.gz) of <class>/<image> files")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a random subset of this many images")
    parser.add_argument("--latency-images", type=int, default=1000, help="images timed at batch 1 per candidate")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    started = time.perf_counter()

    bundle = load_bundle(args.model, intra_op_threads=1)
    base_bundle = load_bundle(args.baseline or static_twin_folder(Path(args.model)), intra_op_threads=1)
    manifest, space = bundle.manifest, bundle.manifest.search_space
    executor, base_executor = Executor(bundle), Executor(base_bundle)
    costs, base_costs = (architecture.CostTable.of_manifest(b.manifest) for b in (bundle, base_bundle))
    raw, labels = read_split(Path(args.data), manifest.classes, args.limit)
    pre = manifest.preprocessing
    x = np.stack([imaging.to_input(imaging.to_pixels(imaging.decode(b), pre.input_size), pre) for b in raw])

    sources: dict[str, list[str]] = {}  # code -> where it came from
    for point in executor.operating_points:
        chosen = np.concatenate([executor.policy(x[i : i + BATCH], point) for i in range(0, len(x), BATCH)])
        codes, counts = np.unique(architecture.encode_many(chosen), return_counts=True)
        for code, n in sorted(zip(codes, counts), key=lambda t: -t[1]):
            sources.setdefault(str(code), []).append(f"{point}:{n}")
    fixed = [(a.code, "frequent") for a in manifest.frequent_architectures] + [
        (architecture.encode(architecture.mobilenet_v2(space)), "MobileNetV2 path"),
        (architecture.encode(np.ones((space.num_cells, space.num_modules), bool)), "all modules"),
        (architecture.encode(architecture.cheapest(space)), "cheapest")]
    for code, name in fixed:
        sources.setdefault(code, []).append(name)
    codes = list(sources)
    matrices = np.stack([architecture.apply_empty_cell_rule(
        architecture.decode(c, space.num_cells, space.num_modules)[None], space)[0] for c in codes])

    base_top1 = float((predict(base_executor, x) == labels).mean())
    correct = np.stack([predict(executor, x, m) == labels for m in matrices], axis=1).astype(np.float64)
    default = manifest.default_controller
    est = {"with_controller": costs.latency_ms(matrices, default), "no_controller": costs.latency_ms(matrices)}

    timed = np.sort(np.random.default_rng(0).permutation(len(x))[: args.latency_images])
    xt = x[timed]
    base_space = base_bundle.manifest.search_space
    base_fused = build(GraphLibrary(base_bundle), base_space, np.ones((base_space.num_cells, 1), bool))
    library = GraphLibrary(bundle)
    calls = {"baseline": lambda i: base_executor.run(xt[i : i + 1]), "baseline/fused": lambda i: base_fused(xt[i : i + 1]),
             "controller": lambda i: executor.policy(xt[i : i + 1], default)}
    for code, m in zip(codes, matrices):
        calls[code] = lambda i, m=m: executor.run(xt[i : i + 1], m[None])
        calls[f"{code}/fused"] = lambda i, f=build(library, space, m): f(xt[i : i + 1])
    timing = {k: v["mean_ms"] for k, v in time_in_rounds(calls, len(xt)).items()}
    per_block = np.array([timing[c] for c in codes])
    fused = np.array([timing[f"{c}/fused"] for c in codes])
    meas = {"with_controller": per_block + timing["controller"], "no_controller": per_block}
    meas_fused = {"with_controller": fused + timing["controller"], "no_controller": fused}

    baselines = {"estimated": base_costs.baseline_ms, "measured": timing["baseline"],
                 "fused": timing["baseline/fused"]}
    models = {f"{kind}/{ctrl}": (cost, baselines[kind])
              for kind, table in (("estimated", est), ("measured", meas), ("fused", meas_fused))
              for ctrl, cost in table.items()}
    oracle = {name: oracle_figures(correct, cost, base, base_top1) for name, (cost, base) in models.items()}

    print(f"machine: {platform.platform()}, {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"onnxruntime 1 intra-op thread; {len(labels)} images, {len(xt)} timed at batch 1")
    print(f"baseline bundle {base_bundle.manifest.name}: top-1 {base_top1:.4f}; "
          f"estimated {baselines['estimated']:.4f} ms "
          f"(CostTable.baseline_ms), measured {baselines['measured']:.4f} ms per block, "
          f"{baselines['fused']:.4f} ms fused")
    print(f"controller charged: default point {default}: estimated {costs.controller_ms[default]:.4f} ms, "
          f"measured {timing['controller']:.4f} ms (policy at batch 1)\n")
    print(f"{'architecture':<18} {'top-1':>6} {'est ms':>7} {'+ctrl':>7} {'x base':>6} {'meas ms':>7} {'+ctrl':>7} "
          f"{'x base':>6} {'fused':>7} {'x base':>6}  sources")
    for j, code in enumerate(codes):
        print(f"{code:<18} {correct[:, j].mean():>6.4f} "
              f"{est['no_controller'][j]:>7.4f} {est['with_controller'][j]:>7.4f} "
              f"{est['with_controller'][j] / baselines['estimated']:>6.2f} {meas['no_controller'][j]:>7.4f} "
              f"{meas['with_controller'][j]:>7.4f} {meas['with_controller'][j] / baselines['measured']:>6.2f} "
              f"{meas_fused['with_controller'][j]:>7.4f} {meas_fused['with_controller'][j] / baselines['fused']:>6.2f}  "
              f"{', '.join(sources[code])}")
    print(f"\noracle top-1 at a mean-latency budget (x baseline); any candidate correct: {correct.max(1).mean():.4f}")
    print(f"{'budget':<22}" + "".join(f"{name:>24}" for name in models))
    for r in RATIOS:
        cells = [oracle[n]["top1_at_ratio"][f"{r:.1f}"] for n in models]
        print(f"{r:<22.1f}" + "".join(f"{'infeasible' if v is None else f'{v:.4f}':>24}" for v in cells))
    reach = [oracle[n]["ratio_to_reach_baseline_top1"] for n in models]
    print(f"{f'x base at {base_top1:.4f}':<22}" + "".join(f"{'never' if v is None else f'{v:.3f}':>24}" for v in reach))
    top = [f"{oracle[n]['hull'][-1][0]:.3f} ({oracle[n]['hull'][-1][1]:.4f})" for n in models]
    print(f"{'x base at its best':<22}" + "".join(f"{v:>24}" for v in top))
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f} s")

    if args.json:
        candidates = [{"code": c, "sources": sources[c], "top1": float(correct[:, j].mean()),
                       **{name: float(cost[j]) for name, (cost, _) in models.items()}} for j, c in enumerate(codes)]
        Path(args.json).write_text(json.dumps({
            "model": manifest.name, "version": manifest.version, "images": len(labels), "timed_images": len(xt),
            "baseline": {"bundle": base_bundle.manifest.name, "top1": base_top1, "ms": baselines},
            "controller": {"point": default, "estimated_ms": costs.controller_ms[default],
                           "measured_ms": timing["controller"]},
            "candidates": candidates, "any_candidate_correct": float(correct.max(1).mean()), "oracle": oracle,
            "machine": platform.platform(), "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
