"""Cascade operating points: an image runs the stages in turn and stops at the first confident one.

A stage is an architecture of one of the bundle's networks (service.manifest.Stage). Every image
runs the first stage; those whose confidence in its answer is below the stage's threshold run the
next, and so on; the last stage answers whatever reaches it. A stage at a lower resolution than
the bundle's input reads the prepared input average-pooled by the whole factor (as training's
`training.resolution.downsample` does), so an image is decoded and prepared once, whatever runs.
Stages at other resolutions share nothing else, so nothing else is reused.

The confidence functions here are the ones training fits thresholds with (training/cascade.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from service import architecture


def max_softmax(probabilities: np.ndarray) -> np.ndarray:
    """The top class's probability, per row."""
    return probabilities.max(1)


def margin(probabilities: np.ndarray) -> np.ndarray:
    """The top class's probability minus the runner-up's, per row."""
    top2 = np.partition(probabilities, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


CONFIDENCES = {"max_softmax": max_softmax, "margin": margin}


def confidence(kind: str, logits: np.ndarray) -> np.ndarray:
    """Each row's confidence of kind `kind` (CONFIDENCES) in its top class, from its logits, in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return CONFIDENCES[kind](z / z.sum(axis=1, keepdims=True))


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
    threshold: float | None
    estimated_ms: float
    mflops: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The stage's architecture on full-size rows `x`: pooled to its resolution, then its fused
        graph where the cache has compiled it (it is warmed at start-up), else block by block."""
        xs = pool(x, self.resolution)
        fused = self.executor.fused
        graph = None if fused is None or not fused.enabled else fused.get(self.code, len(xs), self.executed)
        if graph is not None:
            return graph(xs)
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
    def ran(self) -> list[StageRunner]:
        return self.runner.stages[: self.answered + 1]

    @property
    def estimated_ms(self) -> float:
        return sum(stage.estimated_ms for stage in self.ran)

    @property
    def mflops(self) -> float:
        return sum(stage.mflops for stage in self.ran)


@dataclass
class CascadeRun:
    """What a cascade did to each of its rows."""

    logits: np.ndarray  # (N, classes): the answering stage's
    answered: np.ndarray  # (N,) index of the stage that answered (stages 0..answered ran)
    confidences: np.ndarray  # (N, stages): each stage's confidence, NaN where it did not run
    seconds: list[float]  # per stage, for the rows it ran

    def trace(self, runner: "CascadeRunner", row: int) -> Trace:
        answered = int(self.answered[row])
        return Trace(runner, answered, tuple(float(c) for c in self.confidences[row, : answered + 1]))


class CascadeRunner:
    def __init__(self, cascade, executors: dict):
        """`executors`: by network name (None: the bundle's own graphs), as service.executor builds them."""
        self.name = cascade.name
        self.stages = []
        for stage in cascade.stages:
            executor = executors[stage.network]
            space = executor.space
            matrix = architecture.decode(stage.architecture, space.num_cells, space.num_modules)
            executed = architecture.apply_empty_cell_rule(matrix[None], space)[0]
            costs = executor.costs
            self.stages.append(StageRunner(
                executor, stage.network, space.input_size, executed, architecture.encode(executed), stage.confidence,
                stage.threshold, float(costs.latency_ms(executed[None])[0]), float(costs.mflops(executed[None])[0])))

    def run(self, x: np.ndarray) -> CascadeRun:
        """Every row through the stages until one is confident (the last always answers)."""
        n = x.shape[0]
        logits = None
        answered = np.zeros(n, np.int64)
        confidences = np.full((n, len(self.stages)), np.nan)
        seconds = []
        rows = np.arange(n)
        for s, stage in enumerate(self.stages):
            t0 = time.perf_counter()
            out = stage.logits(x if len(rows) == n else x[rows])
            if logits is None:
                logits = np.empty((n, out.shape[1]), np.float32)
            sure = confidence(stage.confidence, out)
            confidences[rows, s] = sure
            stop = np.ones(len(rows), bool) if stage.threshold is None else sure >= stage.threshold
            logits[rows[stop]] = out[stop]
            answered[rows[stop]] = s
            rows = rows[~stop]
            seconds.append(time.perf_counter() - t0)
            if not len(rows):
                break
        return CascadeRun(logits, answered, confidences, seconds)
