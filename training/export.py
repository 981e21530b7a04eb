"""Export a trained run to a model bundle, and its baseline to a static one beside it.

A bundle holds controllers/<point>.onnx, stem.onnx, blocks/<cell>_<module>.onnx, head.onnx,
networks/<name>/ (the cascades' networks, each a static bundle) and manifest.json
(service/manifest.py), every graph with a dynamic batch (training/bundle_writer.py). Each bundle
is written to a partial folder, loaded by the service's own executor and compared with the
PyTorch model on real images, then moved into place.
"""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from service import architecture
from service.bundle import load_bundle, sha256_file
from service.executor import Executor
from service.manifest import (
    GREEDY_THRESHOLD,
    Evaluation,
    FrequentArchitecture,
    Manifest,
    Preprocessing,
    Validation,
    partial_folder,
    static_twin_folder,
    static_twin_name,
)
from training import baseline as baseline_phase
from training import cascade_points, controls, route, shared_twins
from training.bundle_writer import write_bundle
from training.context import Context
from training.evaluate import evaluate, evaluate_controller, fixed_policy, greedy
from training.latency import costs, load_table
from training.rundir import source_revision, write_atomic


def _evaluation(dataset: str, figures: dict, measured_ms: float | None) -> Evaluation:
    escalated = figures.get("escalated")
    return Evaluation(dataset=dataset, split="test", images=figures["images"], top1=round(figures["top1"], 4),
                      mean_estimated_latency_ms=round(figures["latency_ms"], 4), mean_mflops=round(figures["mflops"], 3),
                      mean_modules_executed=round(figures["modules"], 3), architectures=figures["architectures"],
                      mean_measured_latency_ms=None if measured_ms is None else round(measured_ms, 4),
                      escalated=None if escalated is None else round(escalated, 4))


def _validation(figures: dict) -> Validation:
    escalated = figures.get("escalated")
    return Validation(images=figures["images"], top1=round(figures["top1"], 4),
                      mean_estimated_latency_ms=round(figures["latency_ms"], 4),
                      escalated=None if escalated is None else round(escalated, 4))


def default_point(val: dict[str, dict], baseline_top1: float | None, tolerance: float = 0.0) -> str:
    """The fastest point within `tolerance` points of the baseline's top-1 on validation; else the most accurate."""
    fit = [name for name, f in val.items()
           if baseline_top1 is not None and f["top1"] >= baseline_top1 - tolerance / 100 - 1e-12]
    if fit:
        return min(fit, key=lambda name: val[name]["latency_ms"])
    return max(val, key=lambda name: val[name]["top1"])


def measured_latency_ms(bundle: Path, x: np.ndarray, operating_point: str | None = None, warmup: int = 20) -> float:
    """Mean wall-clock per image of the service's executor at batch 1 over the rows of `x`."""
    executor = Executor(load_bundle(bundle))
    for row in x[:warmup]:
        executor.run(row[None], operating_point=operating_point)
    t0 = time.perf_counter()
    for row in x:
        executor.run(row[None], operating_point=operating_point)
    return (time.perf_counter() - t0) / len(x) * 1e3


def _finish(tmp: Path, out: Path, manifest: Manifest) -> None:
    write_atomic(tmp / "manifest.json", (manifest.model_dump_json(indent=2) + "\n").encode())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def run(ctx: Context, bundle: str | None = None, name: str | None = None, baseline_bundle: str | None = None) -> Path:
    """Export the fine-tuned meta-graph with every operating point, and the baseline as a static
    bundle; each is checked against PyTorch through the service's executor before it moves into place."""
    out = Path(bundle) if bundle else ctx.run.path / "bundle"
    finetune = ctx.run.require("finetune")
    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(finetune["model"])
    metagraph.eval()
    points, val_figures = route.points(ctx)
    table = load_table(ctx.run)
    cost = costs(table, ctx.space)
    dataset = Path(ctx.data_root).resolve().name
    revision = source_revision()
    now = datetime.datetime.now(datetime.timezone.utc)
    version = f"{now:%Y%m%d.%H%M%S}-{revision[:12]}"
    baseline_state = ctx.run.load("baseline")
    baseline_val = (baseline_state or {}).get("figures", {}).get("val_top1")
    frequent = frequent_architectures(ctx, metagraph, points)  # of every point of the search
    verdicts = controls.check(ctx, metagraph, points)
    x_test = next(iter(ctx.batches("test", ctx.config.export.latency_images)))[0].numpy()
    tmp = partial_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    bundle_name = name or ctx.config.name
    shared = shared_twins.networks(ctx)  # the baseline trained at every resolution at once, by resolution
    nets, networks, cascades, first_stages = cascade_points.members(ctx, table, shared), [], [], {}
    if nets:
        own = cascade_points.own_architectures(ctx, metagraph, table,
                                                [f.code for f in frequent][: ctx.config.export.top_candidates])
        codes = cascade_points.first_codes(ctx, [f.code for f in frequent])
        firsts = [*cascade_points.shared_members(ctx, table, shared), *cascade_points.multires_members(ctx, table, codes)]
        cascades, cascade_val = cascade_points.fit_points(ctx, nets, own, firsts)
        first_stages = {m.name: m.validation for m in [nets[-1], *firsts]}
        used = {(stage.network, stage.architecture) for c in cascades for stage in c.stages}
        nets = [member for member in [*nets, *firsts] if member.key in used]
        for member in nets:
            folder = f"networks/{member.name}"
            write_bundle(tmp / folder, member.model, {}, member.table, name=f"{bundle_name}-{member.name}",
                         version=version, dataset=dataset, classes=ctx.train.classes, fixed_architecture=member.code,
                         preprocessing=cascade_points.preprocessing(ctx, member.resolution),
                         training={"network": member.name, "source_revision": revision})
            networks.append(cascade_points.network_entry(folder, member, sha256_file(tmp / folder / "manifest.json")))
        val_figures = {**val_figures, **cascade_val}
        nets += [member for member in own if member.key in used]  # the bundle's own graphs: no network to write
    kept = controls.served(verdicts, len(cascades), ctx.config.export.instance_aware_only)
    for name_, figures in verdicts.items():
        figures["served"] = name_ in kept
        ctx.run.log("export", controller_point=name_, **{k: v for k, v in figures.items() if k != "point_minus_shuffled"},
                    **{f"point_minus_shuffled_{k}": v for k, v in figures.get("point_minus_shuffled", {}).items()})
    points = {name_: points[name_] for name_ in kept}
    val_figures = {k: v for k, v in val_figures.items() if k in points or k in {c.name for c in cascades}}
    test = {name_: evaluate_controller(ctx, metagraph, c, cost, "test") for name_, c in points.items()}
    test.update({c.name: cascade_points.test_figures(ctx, nets, c) for c in cascades})
    default = default_point(val_figures, baseline_val, ctx.config.export.default_tolerance)
    training = {"config": ctx.config.to_dict(), "source_revision": revision,
                "validation": {k: {m: v for m, v in f.items()} for k, f in val_figures.items()},
                "first_stages": first_stages, "controller_controls": verdicts}
    manifest = write_bundle(
        tmp, metagraph, points, table, name=bundle_name, version=version, dataset=dataset,
        classes=ctx.train.classes, default_controller=default,
        preprocessing=Preprocessing(input_size=ctx.space.input_size, mean=ctx.mean, std=ctx.std),
        frequent_architectures=frequent, training=training, networks=networks, cascades=cascades)
    diffs = {p: check_parity(ctx, tmp, metagraph, c, p) for p, c in points.items()}
    diffs.update({c.name: cascade_points.check_parity(ctx, tmp, nets, c) for c in cascades})
    measured = {p: measured_latency_ms(tmp, x_test, p) for p in [*points, *(c.name for c in cascades)]}
    manifest = manifest.model_copy(update={
        "controllers": [c.model_copy(update={"evaluation": _evaluation(dataset, test[c.name], measured[c.name]),
                                             "validation": _validation(val_figures[c.name])})
                        for c in manifest.controllers],
        "cascades": [c.model_copy(update={"evaluation": _evaluation(dataset, test[c.name], measured[c.name]),
                                          "validation": _validation(val_figures[c.name])})
                     for c in manifest.cascades]})
    _finish(tmp, out, manifest)
    for p in [*points, *(c.name for c in cascades)]:
        ctx.run.log("export", variant=p, parity_max_abs_diff=diffs[p], measured_latency_ms=measured[p],
                    **{f"test_{k}": v for k, v in test[p].items()})
        print(f"exported {p}: test top1={test[p]['top1']:.4f}, {measured[p]:.3f} ms measured, "
              f"{test[p]['latency_ms']:.3f} ms estimated, parity {diffs[p]:.2g}", flush=True)
    if baseline_state is not None and baseline_state.get("done"):
        export_baseline(ctx, Path(baseline_bundle) if baseline_bundle else static_twin_folder(out),
                        baseline_phase.load(ctx), table, name=static_twin_name(name or ctx.config.name),
                        version=version, dataset=dataset, x_test=x_test, revision=revision)
    return out


def export_baseline(ctx: Context, out: Path, model, table: dict, *, name: str, version: str, dataset: str,
                    x_test: np.ndarray, revision: str) -> Path:
    """The standalone MobileNetV2 as a static bundle: one module per cell, its 17 blocks only."""
    space = model.space
    sub_table = {**table, "blocks": [[row[0]] for row in table["blocks"]]}
    matrix = np.ones((space.num_cells, 1), bool)
    result = evaluate(model, ctx.batches("test"), fixed_policy(matrix))
    cost = costs(sub_table, space)
    figures = {**result, "latency_ms": float(cost.latency_ms(matrix[None])[0]),
               "mflops": float(cost.mflops(matrix[None])[0])}
    tmp = partial_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = write_bundle(tmp, model, {}, sub_table, name=name, version=version, dataset=dataset,
                            classes=ctx.train.classes, fixed_architecture=architecture.encode(matrix),
                            preprocessing=Preprocessing(input_size=space.input_size, mean=ctx.mean, std=ctx.std),
                            training={"phase": "baseline", "config": ctx.config.to_dict(), "source_revision": revision})
    diff = check_parity(ctx, tmp, model, None)
    manifest = manifest.model_copy(update={"evaluation": _evaluation(dataset, figures, measured_latency_ms(tmp, x_test))})
    _finish(tmp, out, manifest)
    ctx.run.log("export", variant="mobilenet_v2", bundle=str(out), parity_max_abs_diff=diff,
                measured_latency_ms=manifest.evaluation.mean_measured_latency_ms, test_top1=figures["top1"])
    print(f"exported {out}: test top1={figures['top1']:.4f}, "
          f"{manifest.evaluation.mean_measured_latency_ms:.3f} ms measured", flush=True)
    return out


@torch.no_grad()
def frequent_architectures(ctx: Context, metagraph, points: dict, keep: int = 16) -> list[FrequentArchitecture]:
    """The architectures the operating points choose most often on the validation split."""
    counts: dict[str, int] = {}
    total = 0
    for controller in points.values():
        result = evaluate(metagraph, ctx.batches("val"), greedy(controller))
        for code, n in result["codes"].items():
            counts[code] = counts.get(code, 0) + n
        total += result["images"]
    top = sorted(counts.items(), key=lambda item: -item[1])[:keep]
    return [FrequentArchitecture(code=code, share=round(n / total, 4)) for code, n in top]


@torch.no_grad()
def check_parity(ctx: Context, bundle: Path, metagraph, controller, operating_point: str | None = None,
                 images: int = 64, tolerance: float = 1e-4) -> float:
    """Run real test images through the service's executor and the PyTorch model; they must agree.
    `controller` None checks a static bundle's fixed architecture."""
    loaded = load_bundle(bundle)
    executor = Executor(loaded)
    x, _ = next(iter(ctx.batches("test", images)))
    x = x.cpu()
    metagraph = metagraph.cpu().float()
    if controller is None:
        policy = torch.from_numpy(executor.policy(x.numpy()))
    else:
        controller = controller.cpu().float()
        policy = controller(x) >= GREEDY_THRESHOLD
    expected = metagraph(x, policy).numpy()
    result = executor.run(x.numpy(), operating_point=operating_point)
    served_policy = result.executed
    torch_executed = architecture.apply_empty_cell_rule(policy.numpy(), metagraph.space)
    if not np.array_equal(served_policy, torch_executed):
        raise RuntimeError("exported controller chose other architectures than the PyTorch controller")
    diff = float(np.abs(result.logits - expected).max())
    if diff > tolerance:
        raise RuntimeError(f"exported bundle differs from the PyTorch model by {diff:.3g} (> {tolerance})")
    metagraph.to(ctx.device, memory_format=ctx.memory_format)
    if controller is not None:
        controller.to(ctx.device, memory_format=ctx.memory_format)
    return diff
