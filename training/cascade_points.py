"""The export's cascade operating points: the baseline, its co-adapted and shared-weight copies, its
twins and architectures of the multi-resolution meta-graph as networks of the bundle, thresholds
fitted on the validation split, figures measured on the test split.

Each `cascade-<tolerance>` point runs a first stage at a lower resolution (the lowest-resolution twin,
or, with phase `shared_twins`, the shared-weight baseline at that resolution, or, with phase
`multires`, an architecture of the meta-graph at that resolution, whichever fits cheaper on
validation) and sends the images it is not confident about to a full-resolution network: the
baseline; its copy fine-tuned on the images the twin escalates (phase `coadapt`), where that copy is
better than the baseline on the validation images the twin is least sure about (the images it was
trained for; more candidates are more chances for a lucky fit); or the shared-weight baseline at
full resolution, where it is better than the baseline on validation. One point per
`export.cascade_tolerances`: of every last stage, confidence kind and blend, the cheapest threshold
whose validation top-1 is within that many points of the baseline's, cost estimated from the
networks' measured tables as the service estimates it.
The confidence kinds are the plain ones (max softmax, top-2 margin) and a learned gate on the twin's
answer (training/gate.py), which a point uses only where it is cheaper on validation. One more
point, `cascade-top` (top_point), starts with the twin and adds a third stage, an architecture of the bundle's own meta-graph,
for the images the baseline is still unsure about: the most accurate on validation at no more MFLOPs
than the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service import architecture
from service.bundle import load_bundle
from service.executor import Executor
from service.manifest import Cascade, Network, Preprocessing, Stage
from training import baseline as baseline_phase
from training import cascade, coadapt, gate, multires, twins
from training.context import Context
from training.evaluate import fixed_policy
from training.latency import costs, measure
from training.resolution import downsample

BASELINE = "mobilenet_v2"  # the baseline's network name in a bundle
COADAPTED = f"{BASELINE}-coadapted"  # the baseline fine-tuned on the images the first stage escalates
SHARED = f"{BASELINE}-shared"  # the baseline trained at every resolution at once (phase `shared_twins`); `@<r>` below
TOP = "cascade-top"  # the most accurate cascade at no more MFLOPs than the baseline (top_point)


def network_name(resolution: int, input_size: int) -> str:
    """`mobilenet_v2` at the input size, `mobilenet_v2@16` at 16x16."""
    return BASELINE if resolution == input_size else f"{BASELINE}@{resolution}"


@dataclass
class Member:
    """A network of the bundle, or one architecture of the bundle's own meta-graph (name None): its
    model, the architecture that runs (None: module 0 of every cell), resolution and cost table."""

    name: str | None
    resolution: int
    model: torch.nn.Module  # a MetaGraph, eval mode
    table: dict
    matrix: np.ndarray | None = None  # (cells, modules) of the model's space
    validation: dict | None = None  # as a first stage: its validation top-1 and estimated latency (fit_points)

    @property
    def architecture(self) -> np.ndarray:
        return np.ones((self.model.space.num_cells, 1), bool) if self.matrix is None else self.matrix

    @property
    def code(self) -> str:
        return architecture.encode(self.architecture)

    @property
    def key(self) -> tuple[str | None, str]:
        """What a cascade stage names it by: (network, architecture)."""
        return self.name, self.code

    def cost(self) -> tuple[float, float]:
        """(estimated ms, MFLOPs) of its architecture, as the service's cost model charges it."""
        table = costs({**self.table, "controller": {"latency_ms": 0.0, "mflops": 0.0}}, self.model.space)
        matrix = self.architecture[None]
        return float(table.latency_ms(matrix)[0]), float(table.mflops(matrix)[0])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Its logits for full-size inputs `x` (pooled to its resolution)."""
        model = self.model.cpu().float()
        return model.forward_selected(downsample(x.cpu(), self.resolution), fixed_policy(self.architecture)(x)).numpy()

    def logits(self, ctx: Context, split: str) -> np.ndarray:
        return np.concatenate([self.predict(x) for x, _ in ctx.batches(split)])


def members(ctx: Context, table: dict, shared: dict[int, torch.nn.Module]) -> list[Member]:
    """The networks a cascade may run: the baseline at full resolution, its co-adapted copy and its
    shared-weight copy at full resolution (`shared`: shared_twins.networks) when the run has them,
    then each twin (highest resolution first); empty without twins."""
    lows = twins.load(ctx)
    if not lows:
        return []
    size = ctx.space.input_size
    base = baseline_phase.load(ctx).cpu()
    sub_table = {**table, "blocks": [[row[0]] for row in table["blocks"]]}
    out = [Member(BASELINE, size, base, sub_table)]
    adapted = coadapt.load(ctx)
    if adapted:
        out.append(Member(COADAPTED, size, adapted["coadapted"].cpu(), sub_table))
    if shared:
        out.append(Member(SHARED, size, shared[size], sub_table))
    for r in sorted(lows, reverse=True):
        model = ctx.new_metagraph(ctx.baseline_space_at(r)).cpu()
        model.load_state_dict(lows[r].model.state_dict())
        model.eval()
        own = measure(ctx, model)
        own["profile"]["dispatch_ms"] = table["profile"].get("dispatch_ms", 0.0)
        out.append(Member(network_name(r, size), r, model, own))
    return out


def shared_members(ctx: Context, table: dict, shared: dict[int, torch.nn.Module]) -> list[Member]:
    """The shared-weight baseline (`shared`: shared_twins.networks) at each lower resolution, as
    first-stage candidates named `mobilenet_v2-shared@<resolution>`; empty without it."""
    out = []
    for r, net in sorted(shared.items()):
        if r < ctx.space.input_size:
            own = measure(ctx, net)
            own["profile"]["dispatch_ms"] = table["profile"].get("dispatch_ms", 0.0)
            out.append(Member(f"{SHARED}@{r}", r, net, own))
    return out


def multires_members(ctx: Context, table: dict, codes: list[str]) -> list[Member]:
    """Architectures `codes` of the multi-resolution meta-graph (phase `multires`) at each of its lower
    resolutions, as first-stage candidates: each a static network named `<code>@<resolution>`, its
    batch norms re-estimated on it alone; empty when the run has no such phase."""
    model = multires.load(ctx)
    if model is None:
        return []
    space = ctx.space
    out = []
    for r in model.resolutions[:-1]:
        own = None
        for code in dict.fromkeys(codes):
            matrix = architecture.decode(code, space.num_cells, space.num_modules)
            net = multires.reestimated(ctx, model.plain(r, ctx.space_at(r)), r, matrix)
            if own is None:  # one table a resolution: the blocks' costs do not depend on their weights
                own = measure(ctx, net)
                own["profile"]["dispatch_ms"] = table["profile"].get("dispatch_ms", 0.0)
            out.append(Member(f"{code}@{r}", r, net, own, matrix))
    return out


def first_codes(ctx: Context, frequent: list[str]) -> list[str]:
    """The architectures tried as first stages at each lower resolution: MobileNetV2's, the cheapest,
    and the `export.first_candidates` most frequent of the controllers' (`frequent`)."""
    space = ctx.space
    fixed = [architecture.encode(architecture.mobilenet_v2(space)), architecture.encode(architecture.cheapest(space))]
    return list(dict.fromkeys([*fixed, *frequent[: ctx.config.export.first_candidates]]))


def describe(member: Member) -> str:
    """How a point's description names a first stage."""
    at = f"{member.resolution}x{member.resolution}"
    if member.name.startswith(SHARED):
        return f"{at} shared-weight twin"
    return f"{at} twin" if member.name.startswith(BASELINE) else f"the meta-graph's architecture {member.code} at {at}"


def fit_points(ctx: Context, nets: list[Member], candidates: list[Member] = (),
               firsts: list[Member] = ()) -> tuple[list[Cascade], dict[str, dict]]:
    """One cascade per tolerance (first: the lowest-resolution twin or one of `firsts`, architectures
    of the multi-resolution meta-graph; last: a full-resolution network),
    fitted on validation: of every first stage, last stage (the co-adapted copy only where it beats the baseline on
    the validation images the twin is least sure about: what it was trained on, whichever first stage
    a point then takes), confidence kind and blend (`export.cascade_blends`), the cheapest threshold from
    which on the cascade stays within the tolerance of the baseline (training.cascade.cheapest_pair);
    and each point's validation figures {top1, latency_ms, escalated, confidence, threshold, blend,
    network, first}, with, where `export.gate_folds` is set, the learned gate's on the chosen first
    stage (`gate`, training/gate.py) and the plain confidences' best (`plain`): where the gate is
    cheaper at the same validation top-1, the point's first stage uses it. With
    `candidates` (architectures of the bundle's meta-graph), one more point: `TOP` (top_point)."""
    first = nets[-1]
    firsts = [first, *firsts]
    lasts = [n for n in nets if n.resolution == ctx.space.input_size]
    by_name = {n.name: n for n in nets}
    labels = np.concatenate([y.numpy() for _, y in ctx.batches("val")])
    logits = {n.name: n.logits(ctx, "val") for n in (*firsts, *lasts)}
    for candidate in firsts:
        candidate.validation = {"top1": float((logits[candidate.name].argmax(1) == labels).mean()),
                                "latency_ms": candidate.cost()[0], "mflops": candidate.cost()[1]}
        ctx.run.log("export", first_stage=candidate.name, **{f"val_{k}": v for k, v in candidate.validation.items()})
        print(f"export: first-stage candidate {candidate.name}: validation top-1 {candidate.validation['top1']:.4f}, "
              f"{candidate.validation['latency_ms']:.4f} ms estimated", flush=True)
    if COADAPTED in logits:  # a candidate only where it does what it was trained for
        cfg = ctx.config.coadapt
        hard = coadapt.routed(cascade.confidence(cfg.confidence, logits[first.name]), cfg.share)
        routed = {name: float((logits[name].argmax(1) == labels)[hard].mean()) for name in (BASELINE, COADAPTED)}
        kept = routed[COADAPTED] > routed[BASELINE]
        ctx.run.log("export", coadapted_routed_val_top1=routed[COADAPTED], baseline_routed_val_top1=routed[BASELINE],
                    coadapted_candidate=kept)
        print(f"export: on the {cfg.share:g} of validation images the first stage is least sure about, the co-adapted "
              f"copy {routed[COADAPTED]:.4f}, the baseline {routed[BASELINE]:.4f}: "
              f"{'a' if kept else 'not a'} last-stage candidate", flush=True)
        if not kept:
            lasts = [n for n in lasts if n.name != COADAPTED]
    if SHARED in logits:  # a candidate only where it is the better full-resolution network
        top1 = {name: float((logits[name].argmax(1) == labels).mean()) for name in (BASELINE, SHARED)}
        kept = top1[SHARED] > top1[BASELINE]
        ctx.run.log("export", shared_val_top1=top1[SHARED], baseline_val_top1=top1[BASELINE], shared_candidate=kept)
        print(f"export: on validation, the shared-weight baseline {top1[SHARED]:.4f}, the baseline "
              f"{top1[BASELINE]:.4f}: {'a' if kept else 'not a'} last-stage candidate", flush=True)
        if not kept:
            lasts = [n for n in lasts if n.name != SHARED]
    base_top1 = float((logits[BASELINE].argmax(1) == labels).mean())
    points, figures = [], {}
    for tolerance in ctx.config.export.cascade_tolerances:
        best = cascade.cheapest_pair({f.name: (logits[f.name], f.cost()[0]) for f in firsts},
                                     {n.name: (logits[n.name], n.cost()[0]) for n in lasts}, labels,
                                     base_top1 - tolerance / 100, ctx.config.export.cascade_blends)
        name = f"cascade-{tolerance:g}"
        if name in figures:
            continue
        start = next(f for f in firsts if f.name == best["first"])
        if ctx.config.export.gate_folds:  # for the best plain point's first stage
            g = gate_figures(ctx, logits, start, lasts, labels, base_top1 - tolerance / 100, best)
            if "unavailable" in g:
                print(f"export {name}: no learned gate: {g['unavailable']}", flush=True)
            else:
                print(f"export {name}: learned gate {g['latency_ms']:.4f} ms at {g['escalated']:.3f} escalated, "
                      f"plain {best['confidence']} {best['latency_ms']:.4f} ms at {best['escalated']:.3f} "
                      f"(validation): {'cheaper: the point uses it' if g['kept'] else 'not cheaper'}", flush=True)
            plain = {k: v for k, v in best.items() if k != "gate"}
            if g["kept"]:
                best = {**best, **{k: g[k] for k in ("top1", "latency_ms", "escalated", "threshold", "blend", "network",
                                                     "weights")}, "confidence": "gate"}
            best["gate"], best["plain"] = {k: v for k, v in g.items() if k != "weights"}, plain
        kind, threshold, share, last = best["confidence"], best["threshold"], best["blend"], best["network"]
        stages = [Stage(network=start.name, architecture=start.code, confidence=kind, threshold=round(threshold, 6),
                        gate=best.pop("weights", None)),
                  Stage(network=last, architecture=by_name[last].code, blend=share)]
        points.append(Cascade(name=name, stages=stages, description=(
            f"{describe(start)}, then {'the baseline' if last == BASELINE else last} "
            + (f"where its learned gate's confidence is below {threshold:.4f}" if kind == "gate"
               else f"where its {kind.replace('_', ' ')} is below {threshold:.4f}")
            + (f", blending {share:g} of the first stage's answer" if share else "")
            + f": within {tolerance:g} points of the baseline on validation")))
        figures[name] = best
    if candidates:
        point, figure = top_point(ctx, first, lasts, candidates, logits, labels)
        if point is not None:
            points.append(point)
            figures[point.name] = figure
    return points, figures


def top_point(ctx: Context, first: Member, lasts: list[Member], candidates: list[Member],
              logits: dict[str, np.ndarray], labels: np.ndarray) -> tuple[Cascade | None, dict | None]:
    """`TOP`: the most accurate cascade on validation at no more MFLOPs than the baseline. The first
    stage, then a full-resolution network where its confidence is low, then, where the answer so far
    is still unsure, an architecture of the bundle's meta-graph (`candidates`) blended with it:
    networks trained apart err on different images, so their mixed answer is right more often than
    either, and only the images that need it pay for it. Of every last network, candidate, blend
    (`export.cascade_blends` into the second stage, `export.top_blends` into the third) and
    confidence kind, the thresholds from training.cascade.fit_three; None where nothing fits the budget."""
    cfg = ctx.config.export
    budget = next(n for n in lasts if n.name == BASELINE).cost()[1]
    sure = {kind: cascade.confidence(kind, logits[first.name]) for kind in cascade.CONFIDENCES}
    best = None
    for candidate in candidates:
        own = candidate.logits(ctx, "val")
        for last in lasts:
            for share in cfg.cascade_blends:
                second = cascade.blend(logits[last.name], logits[first.name], share)
                for top_share in cfg.top_blends:
                    third = cascade.blend(own, second, top_share)
                    right = np.stack([out.argmax(1) == labels for out in (logits[first.name], second, third)])
                    mflops = (first.cost()[1], last.cost()[1], candidate.cost()[1])
                    for kind2 in cascade.CONFIDENCES:
                        sure2 = cascade.confidence(kind2, second)
                        for kind1 in cascade.CONFIDENCES:
                            fitted = cascade.fit_three(sure[kind1], sure2, right, mflops, budget)
                            if fitted is not None and (best is None or (fitted.top1, -fitted.mflops) > best[0]):
                                best = ((fitted.top1, -fitted.mflops), fitted, candidate, last, share, top_share,
                                        (kind1, kind2))
    if best is None:
        return None, None
    _, fitted, candidate, last, share, top_share, kinds = best
    (t1, t2), (up, again) = fitted.thresholds, fitted.escalated
    stages = [Stage(network=first.name, architecture=first.code, confidence=kinds[0], threshold=round(t1, 6)),
              Stage(network=last.name, architecture=last.code, confidence=kinds[1], threshold=round(t2, 6), blend=share),
              Stage(network=None, architecture=candidate.code, blend=top_share)]
    ms = first.cost()[0] + up * last.cost()[0] + again * candidate.cost()[0]
    description = (
        f"{first.resolution}x{first.resolution} twin, then {'the baseline' if last.name == BASELINE else last.name} where "
        f"its {kinds[0].replace('_', ' ')} is below {t1:.4f}" + (f" (blending {share:g} of the twin's answer)" if share else "")
        + f", then where the answer's {kinds[1].replace('_', ' ')} is still below {t2:.4f} the meta-graph's architecture "
        f"{candidate.code}, blending {top_share:g} of the answer so far: the most accurate on validation at no more "
        "MFLOPs than the baseline")
    figures = {"top1": fitted.top1, "images": len(labels), "latency_ms": ms, "mflops": fitted.mflops, "escalated": up,
               "escalated_to_last": again, "confidence": list(kinds), "threshold": [t1, t2], "blend": [share, top_share],
               "network": last.name, "architecture": candidate.code}
    return Cascade(name=TOP, stages=stages, description=description), figures


def own_architectures(ctx: Context, metagraph: torch.nn.Module, table: dict, codes: list[str]) -> list[Member]:
    """The bundle's own meta-graph running each architecture of `codes`, as cascade stages (network None)."""
    space = ctx.space
    return [Member(None, space.input_size, metagraph, table, architecture.decode(code, space.num_cells, space.num_modules))
            for code in codes]


def gate_figures(ctx: Context, logits: dict[str, np.ndarray], first: Member, lasts: list[Member], labels: np.ndarray,
                 floor: float, plain: dict) -> dict:
    """The learned gate (training/gate.py) against the plain point `plain` at the same validation
    floor: of every last stage and blend, the gate's cheapest cascade holding it, its threshold fitted
    on cross-fitted scores (so its figures are out of sample); `kept`: whether it is cheaper than
    `plain` there, and then `weights`, the gate fitted on all the validation images it learns from,
    which the point serves with that threshold."""
    first_right = logits[first.name].argmax(1) == labels
    best = None
    for last in lasts:
        for share in ctx.config.export.cascade_blends:
            last_right = cascade.blend(logits[last.name], logits[first.name], share).argmax(1) == labels
            try:
                fitted = gate.compare(logits[first.name], first_right, last_right, floor, first.cost()[0],
                                      last.cost()[0], ctx.config.export.gate_folds, ctx.config.seed)["gate"]
            except ValueError as exc:  # too few images of a label to learn from (a tiny validation split)
                return {"kept": False, "unavailable": str(exc)}
            if best is None or (fitted["latency_ms"], -fitted["top1"]) < (best["latency_ms"], -best["top1"]):
                best = {**fitted, "blend": share, "network": last.name, "last_right": last_right}
    last_right = best.pop("last_right")
    best["kept"] = bool(best["latency_ms"] < plain["latency_ms"] - 1e-9 and best["top1"] >= floor - 1e-12)
    if best["kept"]:
        best["weights"] = [float(w) for w in gate.fit_all(gate.features(logits[first.name]), first_right, last_right)]
    return best


def answers(point: Cascade, logits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(answer logits, answering stage) of every row under `point`, from each stage's logits on all
    rows (`logits`, by (network, architecture)), by the service's rule."""
    previous, answered = None, None
    final = None
    for s, stage in enumerate(point.stages):
        out = logits[stage.network, stage.architecture]
        out = out if previous is None else cascade.blend(out, previous, stage.blend)
        if final is None:
            final, answered = np.empty_like(out, np.float64), np.full(len(out), -1)
        reach = answered < 0
        stop = reach if stage.threshold is None else reach & (cascade.confidence(stage.confidence, out, stage.gate)
                                                              >= stage.threshold)
        final[stop] = out[stop]
        answered[stop] = s
        previous = out
    return final, answered


def test_figures(ctx: Context, nets: list[Member], point: Cascade) -> dict:
    """The cascade's figures on the test split, from PyTorch logits (what the service computes)."""
    by_key = {n.key: n for n in nets}
    labels = np.concatenate([y.numpy() for _, y in ctx.batches("test")])
    keys = {(stage.network, stage.architecture) for stage in point.stages}
    final, answered = answers(point, {key: by_key[key].logits(ctx, "test") for key in keys})
    ms, mflops = np.zeros(len(labels)), np.zeros(len(labels))
    for s, stage in enumerate(point.stages):
        cost_ms, cost_mflops = by_key[stage.network, stage.architecture].cost()
        ms[answered >= s] += cost_ms
        mflops[answered >= s] += cost_mflops
    return {"top1": float((final.argmax(1) == labels).mean()), "images": len(labels), "latency_ms": float(ms.mean()),
            "mflops": float(mflops.mean()), "modules": float(ctx.space.num_cells),
            "architectures": int(len(np.unique(answered))), "escalated": float((answered > 0).mean())}


def check_parity(ctx: Context, bundle: Path, nets: list[Member], point: Cascade, images: int = 64,
                 tolerance: float = 1e-4) -> float:
    """Real test images through the service's executor and through PyTorch: every row must stop at
    the same stage (rows within 1e-5 of a threshold aside) with the same logits."""
    executor = Executor(load_bundle(bundle))
    x, _ = next(iter(ctx.batches("test", images)))
    result = executor.run(x.numpy(), operating_point=point.name)
    by_key = {n.key: n for n in nets}
    expected = []  # each stage's answer on every row, blends included
    for stage in point.stages:
        own = by_key[stage.network, stage.architecture].predict(x)
        expected.append(own if not expected else cascade.blend(own, expected[-1], stage.blend))
    worst = 0.0
    for row, trace in enumerate(result.traces):
        for s, stage in enumerate(point.stages[:-1]):
            sure = float(cascade.confidence(stage.confidence, expected[s][row : row + 1], stage.gate)[0])
            if abs(sure - stage.threshold) < 1e-5:
                break  # on the threshold: either side is right to rounding
            if (sure >= stage.threshold) != (trace.answered == s):
                raise RuntimeError(f"cascade {point.name}: image {row} stops at stage {trace.answered} served, "
                                   f"but its stage-{s} confidence {sure:.6f} against {stage.threshold} says otherwise")
            if sure >= stage.threshold:
                break
        worst = max(worst, float(np.abs(result.logits[row] - expected[trace.answered][row]).max()))
    if worst > tolerance:
        raise RuntimeError(f"cascade {point.name}: the served logits differ from PyTorch's by {worst:.3g} (> {tolerance})")
    return worst


def network_entry(folder: Path, member: Member, sha256: str) -> Network:
    return Network(name=member.name, path=str(folder), sha256=sha256, resolution=member.resolution)


def preprocessing(ctx: Context, resolution: int) -> Preprocessing:
    return Preprocessing(input_size=resolution, mean=ctx.mean, std=ctx.std)
