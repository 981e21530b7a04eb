"""The executor: controller, then stem, then per cell only the selected modules, then head.

Rows of a batch may choose different architectures. Each (cell, module) graph runs
once per batch on exactly the rows that selected it, and its output (divided by the
row's module count when the space's `combine` is the mean) is added into those rows; a
residual cell starts from its input (so an empty residual cell is the identity), any
other cell from zero. This mirrors `MetaGraph.forward_selected` in
training, and the parity tests hold the two to the same logits.

With a `FusedCache` (service/fused.py), rows whose architecture has a compiled fused graph
run it instead, one call per architecture on exactly those rows; the other rows take the
per-block path together. `run_batch` serves rows that came from different requests: the
controller runs once per operating point on the rows that asked for it.

A cascade operating point (service/cascade.py) runs its stages on its rows, each stage on
the executor of its network (one `Executor` per network of the bundle, sharing the fused cache).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service import architecture
from service.architecture import CostTable
from service.bundle import Bundle
from service.cascade import CascadeRunner, Trace


@dataclass
class Result:
    logits: np.ndarray  # (N, classes)
    probabilities: np.ndarray  # (N, classes), softmax of logits
    executed: np.ndarray  # (N, cells, modules) bool: what ran, empty-cell rule applied
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, for the whole batch
    operating_point: str | None = None  # the controller that chose; None for a static or given architecture
    # per row: the controller that chose that row's architecture (None: static or given); set by run_batch
    operating_points: list[str | None] | None = None
    fused_rows: int = 0  # rows that ran a fused whole-architecture graph
    # per row: how a cascade point answered it (None: no cascade ran); None when no row ran one
    traces: list[Trace | None] | None = None
    codes: list[str] | None = None  # per row: the code of `executed`, where the executor knew it (else None)

    def point(self, row: int) -> str | None:
        return self.operating_point if self.operating_points is None else self.operating_points[row]

    def trace(self, row: int) -> Trace | None:
        return None if self.traces is None else self.traces[row]


def softmax(logits: np.ndarray) -> np.ndarray:
    if logits.shape[0] == 1:  # a batch of one (most requests): whole-array reductions, half the time
        e = np.exp(logits - logits.max())
        e /= e.sum()
        return e
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Executor:
    def __init__(self, bundle: Bundle, fused=None):
        """`fused`: a service.fused.FusedCache, or None for the per-block path only."""
        self.bundle = bundle
        self.fused = fused
        manifest = bundle.manifest
        self.space = manifest.search_space
        self.residual = [cell.skippable for cell in self.space.cells]
        self.manifest = manifest
        self._controllers = {c.name: (_Graph(bundle.controllers[c.name]), c.threshold) for c in manifest.controllers}
        self.fixed = None
        if manifest.fixed_architecture is not None:
            matrix = architecture.decode(manifest.fixed_architecture, self.space.num_cells, self.space.num_modules)
            self.fixed = architecture.apply_empty_cell_rule(matrix[None], self.space)[0]
        self.fixed_code = None if self.fixed is None else architecture.encode(self.fixed)
        self._fixed_one = None if self.fixed is None else self.fixed[None]  # a batch of one's, read only
        if self._fixed_one is not None:
            self._fixed_one.flags.writeable = False
        self._stem, self._head = _Graph(bundle.stem), _Graph(bundle.head)
        self._blocks = [[_Graph(bundle.blocks[(c.index, m)]) for m in range(len(c.modules))] for c in self.space.cells]
        self.costs = CostTable.of_manifest(manifest)
        self.networks = {name: Executor(sub, fused=None if fused is None else fused.network(name))
                         for name, sub in bundle.networks.items()}
        self.cascades = {c.name: CascadeRunner(c, {None: self, **self.networks}) for c in manifest.cascades}

    @property
    def operating_points(self) -> list[str]:
        return [*self._controllers, *self.cascades]

    def policy(self, x: np.ndarray, operating_point: str | None = None) -> np.ndarray:
        """(N, cells, modules) boolean: what runs for each image, empty-cell rule applied.
        `operating_point` names the controller (default: the bundle's default)."""
        if self.fixed is not None:
            return np.broadcast_to(self.fixed, (x.shape[0], *self.fixed.shape)).copy()
        point = self.manifest.point_name(operating_point)
        if point in self.cascades:
            raise ValueError(f"operating point {point!r} is a cascade: its stages choose, not a controller")
        controller, threshold = self._controllers[point]
        return architecture.apply_empty_cell_rule(controller(x) >= threshold, self.space)

    def run(self, x: np.ndarray, executed: np.ndarray | None = None, operating_point: str | None = None) -> Result:
        """Classify a (N, 3, H, W) float32 batch with the controller of `operating_point` (default:
        the bundle's); `executed` (N, cells, modules) gives the architectures instead."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        # the point that chooses: none where the architecture is given or fixed
        point = None if executed is not None or self.fixed is not None else self.manifest.point_name(operating_point)
        if point in self.cascades:
            return self._run_cascade(x, point)
        t0 = time.perf_counter()
        code = None  # the architecture of every row, where known without looking
        if executed is None:
            executed = self.policy(x, point)
            code = self.fixed_code
        else:
            executed = architecture.apply_empty_cell_rule(executed, self.space)
        t1 = time.perf_counter()
        logits, fused_rows = self.backbone(x, executed, code)
        t2 = time.perf_counter()
        return Result(logits, softmax(logits), executed, {"controller": t1 - t0, "backbone": t2 - t1}, point,
                      fused_rows=fused_rows)

    def run_batch(self, x: np.ndarray, points: Sequence[str | None], given: Sequence[np.ndarray | None]) -> Result:
        """Classify rows that may want different things: row i runs `given[i]` ((cells, modules)
        architecture) when it is not None, else the controller of `points[i]` (None: the
        bundle's default; a static bundle's fixed architecture). Each controller runs once, on
        its rows; the backbone runs once on the whole batch."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if len(points) != n or len(given) != n:
            raise ValueError(f"{n} rows but {len(points)} points and {len(given)} architectures")
        t0 = time.perf_counter()
        if self.fixed is not None and all(g is None for g in given):  # a static bundle's request: nothing to choose
            executed = self._fixed_one if n == 1 else np.broadcast_to(self.fixed, (n, *self.fixed.shape))
            t1 = time.perf_counter()
            logits, fused_rows = self.backbone(x, executed, self.fixed_code)
            t2 = time.perf_counter()
            return Result(logits, softmax(logits), executed, {"controller": t1 - t0, "backbone": t2 - t1}, None,
                          operating_points=[None] * n, fused_rows=fused_rows, codes=[self.fixed_code] * n)
        executed = np.zeros((n, self.space.num_cells, self.space.num_modules), bool)
        row_points: list[str | None] = [None] * n
        by_point: dict[str, list[int]] = {}
        for i in range(n):
            if given[i] is not None:
                executed[i] = given[i]
            elif self.fixed is not None:
                executed[i] = self.fixed
            else:
                row_points[i] = self.manifest.point_name(points[i])
                by_point.setdefault(row_points[i], []).append(i)
        cascaded = {point: rows for point, rows in by_point.items() if point in self.cascades}
        for point, rows in by_point.items():
            if point not in cascaded:
                executed[rows] = self.policy(x if len(rows) == n else x[rows], point)
        executed = architecture.apply_empty_cell_rule(executed, self.space)
        t1 = time.perf_counter()
        uniform = row_points[0] if len(set(row_points)) == 1 else None
        if not cascaded:
            logits, fused_rows = self.backbone(x, executed)
            t2 = time.perf_counter()
            return Result(logits, softmax(logits), executed, {"controller": t1 - t0, "backbone": t2 - t1}, uniform,
                          operating_points=row_points, fused_rows=fused_rows)
        logits = np.empty((n, self.space.num_classes), np.float32)
        probabilities = np.empty_like(logits)
        traces: list[Trace | None] = [None] * n
        for point, rows in cascaded.items():
            point_logits, point_probabilities, point_traces = self.cascades[point].run(x[rows])
            logits[rows], probabilities[rows] = point_logits, point_probabilities
            for row, trace in zip(rows, point_traces):
                traces[row] = trace
                executed[row] = trace.stage.padded
        rest = np.array([i for i in range(n) if traces[i] is None], np.int64)
        fused_rows = 0
        if len(rest):
            logits[rest], fused_rows = self.backbone(x[rest], executed[rest])
            probabilities[rest] = softmax(logits[rest])
        t2 = time.perf_counter()
        return Result(logits, probabilities, executed, {"controller": t1 - t0, "backbone": t2 - t1}, uniform,
                      operating_points=row_points, fused_rows=fused_rows, traces=traces,
                      codes=None if len(rest) else [trace.stage.padded_code for trace in traces])

    def _run_cascade(self, x: np.ndarray, point: str) -> Result:
        """Every row through the cascade `point` (the common case at batch 1: no bookkeeping of other points)."""
        t0 = time.perf_counter()
        logits, probabilities, traces = self.cascades[point].run(x)
        executed = np.array([trace.stage.padded for trace in traces])
        return Result(logits, probabilities, executed,
                      {"controller": 0.0, "backbone": time.perf_counter() - t0}, point, traces=traces,
                      codes=[trace.stage.padded_code for trace in traces])

    def backbone(self, x: np.ndarray, executed: np.ndarray, code: str | None = None) -> tuple[np.ndarray, int]:
        """Logits of stem, the `executed` blocks (empty-cell rule applied) and head; and how many
        rows ran a fused graph. Rows sharing a cached architecture run its fused graph together;
        the rest take the per-block path together. `code`: every row's architecture, when the
        caller knows they share one (a static bundle's)."""
        if self.fused is None or not self.fused.enabled:
            return self.per_block(x, executed), 0
        n = x.shape[0]
        groups = [(code, None)] if code is not None else _group_rows(executed)[1]
        if len(groups) == 1:
            code, rows = groups[0]
            graph = self.fused.get(code, n, executed[0])
            return (graph(x), n) if graph is not None else (self.per_block(x, executed), 0)
        logits = np.empty((n, self.space.num_classes), np.float32)
        rest: list[np.ndarray] = []
        fused_rows = 0
        for code, rows in groups:
            graph = self.fused.get(code, len(rows), executed[rows[0]])
            if graph is None:
                rest.append(rows)
            else:
                logits[rows] = graph(x[rows])
                fused_rows += len(rows)
        if rest:
            rows = np.sort(np.concatenate(rest))
            logits[rows] = self.per_block(x[rows], executed[rows])
        return logits, fused_rows

    def per_block(self, x: np.ndarray, executed: np.ndarray) -> np.ndarray:
        """Stem, each executed (cell, module) graph once on the rows that chose it, head."""
        h = self._stem(x)
        if len(executed) and (executed == executed[0]).all():
            return self._head(self._one_architecture(h, executed[0]))
        weights = None
        if self.space.combine == "mean":
            weights = (1.0 / np.maximum(executed.sum(2), 1)).astype(np.float32)[:, :, None, None, None]
        for c, blocks in enumerate(self._blocks):
            h = self._cell(c, blocks, h, executed[:, c], None if weights is None else weights[:, c])
        return self._head(h)

    def _one_architecture(self, h: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Every row on one architecture (always so at batch 1): only its blocks are visited, with
        no per-row bookkeeping (the general path checks all of a cell's modules for every cell)."""
        for c, blocks in enumerate(self._blocks):
            modules = np.flatnonzero(matrix[c])
            weight = np.float32(1.0 / max(len(modules), 1)) if self.space.combine == "mean" else None
            out = h if self.residual[c] else None
            for m in modules:
                y = blocks[m](h) if weight is None else blocks[m](h) * weight
                out = y if out is None else out + y
            h = out
        return h

    def _cell(self, c: int, blocks, h: np.ndarray, mask: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        out = h if self.residual[c] else None
        for m, block in enumerate(blocks):
            rows = mask[:, m]
            if rows.all():
                y = block(h) if weights is None else block(h) * weights
                out = y if out is None else out + y
            elif rows.any():
                idx = np.flatnonzero(rows)
                y = block(h[idx])
                if weights is not None:
                    y = y * weights[idx]
                if out is None:
                    out = np.zeros((h.shape[0], *y.shape[1:]), np.float32)
                elif out is h:
                    out = h.copy()
                out[idx] += y
        return out


def _group_rows(executed: np.ndarray) -> tuple[list[str], list[tuple[str, np.ndarray]]]:
    """Every row's architecture code, and [(code, row indices)] of the batch's distinct
    architectures, first seen first."""
    codes = architecture.encode_many(executed)
    groups: dict[str, list[int]] = {}
    for i, code in enumerate(codes):
        groups.setdefault(code, []).append(i)
    return codes, [(code, np.asarray(rows)) for code, rows in groups.items()]


class _Graph:
    """An onnxruntime session called with one input, returning its first output."""

    def __init__(self, session):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x)})[0]
