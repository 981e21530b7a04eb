"""Architectures: cells x modules binary matrices, the empty-cell rule and their codes.

Training and serving both import this file, so the rule that decides what runs in
an empty cell, and the code shown to users, are the same everywhere.

A code writes each cell's module set as a bit mask (bit m = module m) in base-32
digits, cell 0 first: the paper's 17 x 5 space gives 17 characters, and MobileNetV2
(module 0 everywhere) is `11111111111111111`.
"""

from __future__ import annotations

import numpy as np

from service.manifest import SearchSpace

_DIGITS = "0123456789abcdefghijklmnopqrstuv"
_BITS_PER_DIGIT = 5


def apply_empty_cell_rule(policy: np.ndarray, space: SearchSpace) -> np.ndarray:
    """Return the modules that actually run for a (N, cells, modules) boolean policy.

    A cell with no module selected is skipped where it can be (same shape in and out);
    elsewhere its first module runs.
    """
    policy = np.asarray(policy, dtype=bool)
    if policy.ndim != 3 or policy.shape[1:] != (space.num_cells, space.num_modules):
        raise ValueError(f"policy shape {policy.shape} does not fit {space.num_cells} x {space.num_modules}")
    executed = policy.copy()
    must_run = ~np.array([cell.skippable for cell in space.cells])
    empty = ~executed.any(axis=2)
    executed[:, :, 0] |= empty & must_run[None, :]
    return executed


def _digits_per_cell(num_modules: int) -> int:
    return -(-num_modules // _BITS_PER_DIGIT)


def encode(matrix: np.ndarray) -> str:
    """Compact, reversible code of one (cells, modules) boolean matrix."""
    matrix = np.asarray(matrix, dtype=bool)
    width = _digits_per_cell(matrix.shape[1])
    out = []
    for row in matrix:
        mask = sum(1 << m for m in np.flatnonzero(row))
        out.append("".join(_DIGITS[(mask >> (_BITS_PER_DIGIT * d)) & 31] for d in reversed(range(width))))
    return "".join(out)


_DIGIT_BYTES = np.frombuffer(_DIGITS.encode(), dtype=np.uint8)


def encode_many(executed: np.ndarray) -> list[str]:
    """`encode` of every row of an (N, cells, modules) boolean array, vectorised (a batch's codes)."""
    executed = np.asarray(executed, dtype=bool)
    n, cells, modules = executed.shape
    masks = (executed.astype(np.int64) << np.arange(modules)).sum(2)  # (N, cells)
    width = _digits_per_cell(modules)
    digits = np.stack([(masks >> (_BITS_PER_DIGIT * d)) & 31 for d in reversed(range(width))], axis=2)
    return [row.tobytes().decode() for row in _DIGIT_BYTES[digits.reshape(n, cells * width)]]


def decode(code: str, num_cells: int, num_modules: int) -> np.ndarray:
    """Inverse of `encode`; raises ValueError on a code that does not fit the space."""
    width = _digits_per_cell(num_modules)
    code = code.strip().lower()
    if len(code) != num_cells * width or any(ch not in _DIGITS for ch in code):
        raise ValueError(f"architecture code {code!r} does not fit {num_cells} cells x {num_modules} modules")
    matrix = np.zeros((num_cells, num_modules), dtype=bool)
    for c in range(num_cells):
        mask = 0
        for ch in code[c * width : (c + 1) * width]:
            mask = (mask << _BITS_PER_DIGIT) | _DIGITS.index(ch)
        if mask >> num_modules:
            raise ValueError(f"architecture code {code!r} selects a module beyond {num_modules} in cell {c}")
        matrix[c] = [(mask >> m) & 1 for m in range(num_modules)]
    return matrix


def mobilenet_v2(space: SearchSpace) -> np.ndarray:
    """The static MobileNetV2 path: module 0 in every cell."""
    matrix = np.zeros((space.num_cells, space.num_modules), dtype=bool)
    matrix[:, 0] = True
    return matrix


def cheapest(space: SearchSpace) -> np.ndarray:
    """The fastest valid architecture: every skippable cell skipped."""
    return apply_empty_cell_rule(np.zeros((1, space.num_cells, space.num_modules), bool), space)[0]


class CostTable:
    """Per-image cost of an architecture from a measured table.

    `latency_ms` and `mflops` cover what serving runs for one image: the operating point's
    controller (when one chose), stem, the executed blocks and head. Each graph call is
    charged its measured batch-1 latency plus `dispatch_ms`, the executor's own cost per
    call (measured at profiling), so many small blocks cost what they cost in serving. The
    baseline is static MobileNetV2 (module 0 in every cell) in the same space, without a
    controller. Training builds the same table from its latency.json (`from_graphs`), so
    the search is rewarded with the costs the service reports.
    """

    def __init__(self, space, block_ms: np.ndarray, block_mflops: np.ndarray, stem: tuple[float, float],
                 head: tuple[float, float], controllers: dict[str, tuple[float, float]], dispatch_ms: float = 0.0):
        """Costs are (latency_ms, mflops) pairs of one call at batch 1; `controllers` by point name."""
        self.dispatch_ms = dispatch_ms
        self.block_ms = np.asarray(block_ms, np.float64) + dispatch_ms
        self.block_mflops = np.asarray(block_mflops, np.float64)
        self.backbone_ms = stem[0] + head[0] + 2 * dispatch_ms
        self.backbone_mflops = stem[1] + head[1]
        self.controller_ms = {name: ms + dispatch_ms for name, (ms, _) in controllers.items()}
        self.controller_mflops = {name: mflops for name, (_, mflops) in controllers.items()}
        self.baseline_ms = self.backbone_ms + float((self.block_ms * mobilenet_v2(space)).sum())
        self.baseline_mflops = self.backbone_mflops + float((self.block_mflops * mobilenet_v2(space)).sum())

    @classmethod
    def of_manifest(cls, manifest) -> "CostTable":
        space = manifest.search_space
        shape = (space.num_cells, space.num_modules)
        block_ms, block_mflops = np.zeros(shape), np.zeros(shape)
        for b in manifest.blocks:
            block_ms[b.cell, b.module] = b.latency_ms
            block_mflops[b.cell, b.module] = b.mflops
        return cls(space, block_ms, block_mflops, (manifest.stem.latency_ms, manifest.stem.mflops),
                   (manifest.head.latency_ms, manifest.head.mflops),
                   {c.name: (c.latency_ms, c.mflops) for c in manifest.controllers}, manifest.profile.dispatch_ms)

    def latency_ms(self, executed: np.ndarray, controller: str | None = None) -> np.ndarray:
        """(N, cells, modules) executed -> (N,) estimated milliseconds; `controller` names the
        operating point that chose them (None: the architecture was given, no controller ran)."""
        extra = self.controller_ms[controller] if controller else 0.0
        return self.backbone_ms + extra + (np.asarray(executed) * self.block_ms).sum((1, 2))

    def mflops(self, executed: np.ndarray, controller: str | None = None) -> np.ndarray:
        extra = self.controller_mflops[controller] if controller else 0.0
        return self.backbone_mflops + extra + (np.asarray(executed) * self.block_mflops).sum((1, 2))
