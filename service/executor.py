"""The executor: controller, then stem, then per cell only the selected modules, then head.

Rows of a batch may choose different architectures. Each (cell, module) graph runs
once per batch on exactly the rows that selected it, and its output (divided by the
row's module count when the space's `combine` is the mean) is added into those rows; a
residual cell starts from its input (so an empty residual cell is the identity), any
other cell from zero. This mirrors `MetaGraph.forward_selected` in
training, and the parity tests hold the two to the same logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service import architecture
from service.bundle import Bundle


@dataclass
class Result:
    logits: np.ndarray  # (N, classes)
    probabilities: np.ndarray  # (N, classes), softmax of logits
    executed: np.ndarray  # (N, cells, modules) bool: what ran, empty-cell rule applied
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, for the whole batch
    operating_point: str | None = None  # the controller that chose; None for a static or given architecture


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Executor:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        manifest = bundle.manifest
        self.space = manifest.search_space
        self.residual = [cell.skippable for cell in self.space.cells]
        self.default_point = manifest.default_controller
        self._controllers = {c.name: (_Graph(bundle.controllers[c.name]), c.threshold) for c in manifest.controllers}
        self.fixed = None
        if manifest.fixed_architecture is not None:
            matrix = architecture.decode(manifest.fixed_architecture, self.space.num_cells, self.space.num_modules)
            self.fixed = architecture.apply_empty_cell_rule(matrix[None], self.space)[0]
        self._stem, self._head = _Graph(bundle.stem), _Graph(bundle.head)
        self._blocks = [[_Graph(bundle.blocks[(c.index, m)]) for m in range(len(c.modules))] for c in self.space.cells]

    @property
    def operating_points(self) -> list[str]:
        return list(self._controllers)

    def policy(self, x: np.ndarray, operating_point: str | None = None) -> np.ndarray:
        """(N, cells, modules) boolean: what runs for each image, empty-cell rule applied.
        `operating_point` names the controller (default: the bundle's default)."""
        if self.fixed is not None:
            return np.broadcast_to(self.fixed, (x.shape[0], *self.fixed.shape)).copy()
        controller, threshold = self._controllers[operating_point or self.default_point]
        return architecture.apply_empty_cell_rule(controller(x) >= threshold, self.space)

    def run(self, x: np.ndarray, executed: np.ndarray | None = None, operating_point: str | None = None) -> Result:
        """Classify a (N, 3, H, W) float32 batch with the controller of `operating_point` (default:
        the bundle's); `executed` (N, cells, modules) gives the architectures instead."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        t0 = time.perf_counter()
        point = None
        if executed is None:
            if self.fixed is None:
                point = operating_point or self.default_point
            executed = self.policy(x, point)
        else:
            executed = architecture.apply_empty_cell_rule(executed, self.space)
        t1 = time.perf_counter()
        h = self._stem(x)
        weights = None
        if self.space.combine == "mean":
            weights = (1.0 / np.maximum(executed.sum(2), 1)).astype(np.float32)[:, :, None, None, None]
        for c, blocks in enumerate(self._blocks):
            h = self._cell(c, blocks, h, executed[:, c], None if weights is None else weights[:, c])
        logits = self._head(h)
        t2 = time.perf_counter()
        return Result(logits, softmax(logits), executed, {"controller": t1 - t0, "backbone": t2 - t1}, point)

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


class _Graph:
    """An onnxruntime session called with one input, returning its first output."""

    def __init__(self, session):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x)})[0]
