"""Cascade operating points: an image runs the stages in turn and stops at the first confident one.

A stage is an architecture of one of the bundle's networks (service.manifest.Stage). Every image
runs the first stage; those whose confidence in its answer is below the stage's threshold run the
next, and so on; the last stage answers whatever reaches it. A stage at a lower resolution than
the bundle's input reads the prepared input average-pooled by the whole factor (as training's
`training.resolution.downsample` does), so an image is decoded and prepared once, whatever runs.
Stages at other resolutions share no computation. What a later stage can reuse is the previous
stage's answer: with `blend` > 0 its answer mixes the previous stage's probabilities into its own
(`blend`), since two networks that see the image at different resolutions err on different images.

The confidence and blend functions here are the ones training fits thresholds with (training/cascade.py).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from service import architecture


def max_softmax(exps: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The top class's probability, per row, from exp(logit - max logit) and its row sums: the
    top class's exp is exp(0) = 1."""
    return 1.0 / total


def margin(exps: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The top class's probability minus the runner-up's, per row."""
    second = np.partition(exps, -2, axis=1)[:, -2]
    return (1.0 - second) / total


CONFIDENCES = {"max_softmax": max_softmax, "margin": margin}
KINDS = (*CONFIDENCES, "gate")  # every confidence a stage may use: `gate` needs the stage's weights


def gate_features(exps: np.ndarray, total: np.ndarray) -> np.ndarray:
    """What a learned gate reads of each row's answer (training/gate.py): its probabilities sorted from
    the top, their entropy, the top-2 margin and a one-hot of the top class; (N, 2 x classes + 2)."""
    p = exps / total[:, None]
    top = -np.sort(-p, axis=1)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(1, keepdims=True)
    named = np.zeros_like(p)
    named[np.arange(len(p)), p.argmax(1)] = 1.0
    return np.concatenate([top, entropy, top[:, :1] - top[:, 1:2], named], axis=1)


def gate(weights, exps: np.ndarray, total: np.ndarray) -> np.ndarray:
    """A learned gate's confidence per row: one minus its probability that escalating pays, from its
    logistic-regression `weights` (bias last) over `gate_features`."""
    w = np.asarray(weights, np.float64)
    z = gate_features(exps, total) @ w[:-1] + w[-1]
    return 0.5 * (1.0 - np.tanh(0.5 * z))  # 1 - sigmoid(z), without overflow


def sure(kind: str, exps: np.ndarray, total: np.ndarray, weights=None) -> np.ndarray:
    """Each row's confidence of kind `kind` (KINDS), from `exps` (its gate's `weights` for `gate`)."""
    if kind != "gate":
        return CONFIDENCES[kind](exps, total)
    if weights is None:
        raise ValueError("confidence 'gate' needs the gate's weights (the stage's `gate`)")
    return gate(weights, exps, total)


def exps(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(logit - the row's max logit), in float64, and its row sums: what every confidence, probability
    and blend here is computed from."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e, e.sum(axis=1)


def confidence(kind: str, logits: np.ndarray, weights=None) -> np.ndarray:
    """Each row's confidence of kind `kind` (KINDS) in its top class, from its logits, in float64."""
    return sure(kind, *exps(logits), weights)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """The softmax of each row, in float64."""
    e, total = exps(logits)
    return e / total[:, None]


def blend(own: np.ndarray, previous: np.ndarray, share: float) -> np.ndarray:
    """A later stage's answer, as logits (float64): log((1 - share) x softmax(own) + share x
    softmax(previous)); `own` itself when `share` is 0."""
    if not share:
        return own
    return mix(own, probabilities(previous), share)


def mix(own: np.ndarray, previous_probabilities: np.ndarray, share: float) -> np.ndarray:
    """`blend` given the previous stage's probabilities (computed once, when its confidence was)."""
    return np.log((1.0 - share) * probabilities(own) + share * previous_probabilities)


def pool(x: np.ndarray, resolution: int) -> np.ndarray:
    """(N, C, S, S) -> (N, C, resolution, resolution): the mean of each (S / resolution)-square
    (summed as strided views: a tenth of the time of a reduction over the reshaped axes at batch 1)."""
    factor = x.shape[-1] // resolution
    if factor == 1:
        return x
    total = x[:, :, ::factor, ::factor].copy()
    for i in range(factor):
        for j in range(factor):
            if i or j:
                total += x[:, :, i::factor, j::factor]
    total *= np.float32(1.0 / (factor * factor))
    return total


@dataclass(frozen=True)
class StageRunner:
    """One stage, ready to run: its executor, architecture and exit rule."""

    executor: object  # service.executor.Executor of the stage's network
    network: str | None
    resolution: int
    executed: np.ndarray  # (cells, modules) of the network's space, empty-cell rule applied
    code: str
    confidence: str
    gate: tuple[float, ...] | None  # a learned gate's weights, bias last (confidence "gate")
    threshold: float | None
    blend: float  # the previous stage's share in this stage's answer (service.manifest.Stage)
    estimated_ms: float
    mflops: float
    padded: np.ndarray  # `executed` within the bundle's (cells, modules), as the executor's results hold it
    padded_code: str  # the code of `padded`, as responses give it

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The stage's architecture on full-size rows `x`: its fused graph where the cache has
        compiled it (it is warmed at start-up; it pools the rows itself), else block by block on
        the rows pooled to its resolution."""
        fused = self.executor.fused
        graph = None if fused is None or not fused.enabled else fused.get(self.code, len(x), self.executed)
        if graph is not None:
            return graph(x)
        xs = pool(x, self.resolution)
        return self.executor.per_block(xs, np.broadcast_to(self.executed, (len(xs), *self.executed.shape)))


@dataclass(frozen=True)
class Trace:
    """One image's way through a cascade: the stages that ran (0..answered) and their confidences."""

    runner: "CascadeRunner"
    answered: int
    confidences: tuple[float, ...]

    @property
    def escalated(self) -> bool:
        return self.answered > 0

    @property
    def stage(self) -> StageRunner:
        """The stage that answered."""
        return self.runner.stages[self.answered]

    @property
    def ran(self) -> list[StageRunner]:
        return self.runner.stages[: self.answered + 1]

    @property
    def estimated_ms(self) -> float:
        return sum(stage.estimated_ms for stage in self.ran)

    @property
    def mflops(self) -> float:
        return sum(stage.mflops for stage in self.ran)


class CascadeRunner:
    def __init__(self, cascade, executors: dict):
        """`executors`: by network name (None: the bundle's own graphs), as service.executor builds them."""
        self.name = cascade.name
        self.stages = []
        own = executors[None].space
        for stage in cascade.stages:
            executor = executors[stage.network]
            space = executor.space
            matrix = architecture.decode(stage.architecture, space.num_cells, space.num_modules)
            executed = architecture.apply_empty_cell_rule(matrix[None], space)[0]
            costs = executor.costs
            padded = np.zeros((own.num_cells, own.num_modules), bool)
            padded[:, : executed.shape[1]] = executed
            self.stages.append(StageRunner(
                executor, stage.network, space.input_size, executed, architecture.encode(executed), stage.confidence,
                None if stage.gate is None else tuple(stage.gate), stage.threshold, stage.blend, float(costs.latency_ms(executed[None])[0]),
                float(costs.mflops(executed[None])[0]), padded, architecture.encode(padded)))

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Trace]]:
        """Every row through the stages until one is confident (the last always answers): the
        answering stage's logits and probabilities, (N, classes) float32, and each row's trace."""
        n = x.shape[0]
        if n == 1:
            return self._run_one(x)
        logits = probs = None
        answered = np.zeros(n, np.int64)
        confidences = np.full((n, len(self.stages)), np.nan)
        rows = np.arange(n)
        previous = None  # the probabilities of the rows still going, at the stage before
        for s, stage in enumerate(self.stages):
            own = stage.logits(x if len(rows) == n else x[rows])
            out = own if previous is None or not stage.blend else mix(own, previous, stage.blend)
            if logits is None:
                logits, probs = (np.empty((n, out.shape[1]), np.float32) for _ in range(2))
            e, total = exps(out)
            conf = sure(stage.confidence, e, total, stage.gate)
            confidences[rows, s] = conf
            stop = np.ones(len(rows), bool) if stage.threshold is None else conf >= stage.threshold
            p = e / total[:, None]
            logits[rows[stop]] = out[stop]
            probs[rows[stop]] = p[stop]
            answered[rows[stop]] = s
            rows, previous = rows[~stop], p[~stop]
            if not len(rows):
                break
        return logits, probs, [Trace(self, int(a), tuple(confidences[i, : a + 1].tolist())) for i, a in enumerate(answered)]

    def _run_one(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Trace]]:
        """`run` for one row (the common case at batch 1): the same stages and rule on the row's
        ten-odd values as Python floats, where each numpy call on so small an array costs more than
        its arithmetic (equal to `run`'s to rounding: tests/test_cascade_serving.py)."""
        confidences = []
        previous = None  # the previous stage's probabilities
        for s, stage in enumerate(self.stages):
            out = stage.logits(x)[0].tolist()
            if previous is not None and stage.blend:
                share = stage.blend
                own = _probabilities_one(out)
                mixed = [(1.0 - share) * p + share * q for p, q in zip(own, previous)]
                out = [math.log(m) if m > 0 else -math.inf for m in mixed]  # as numpy's log(0): no error
            top = max(out)
            e = [math.exp(v - top) for v in out]
            total = sum(e)
            previous = [v / total for v in e]
            if stage.confidence == "max_softmax":
                conf = 1.0 / total
            elif stage.confidence == "margin":
                conf = (1.0 - heapq.nlargest(2, e)[1]) / total
            else:
                conf = _gate_one(stage.gate, previous)
            confidences.append(conf)
            if stage.threshold is None or conf >= stage.threshold:
                return np.array([out], np.float32), np.array([previous], np.float32), [Trace(self, s, tuple(confidences))]
        raise AssertionError("the last stage has no threshold: it always answers")


def _probabilities_one(logits: list[float]) -> list[float]:
    """The softmax of one row given as Python floats (`probabilities`, row by row)."""
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    total = sum(e)
    return [v / total for v in e]


def _gate_one(weights: tuple[float, ...], p: list[float]) -> float:
    """`gate` for one row, given its probabilities as Python floats."""
    n = len(p)
    top = sorted(p, reverse=True)
    entropy = -sum(v * math.log(max(v, 1e-12)) for v in p)
    z = weights[-1] + sum(w * v for w, v in zip(weights, top)) + weights[n] * entropy
    z += weights[n + 1] * (top[0] - top[1]) + weights[n + 2 + p.index(top[0])]
    return 0.5 * (1.0 - math.tanh(0.5 * z))
