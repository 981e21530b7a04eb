"""Which operating point answers a request, and why.

A bundle may carry several operating points: controllers over the same blocks (variants A..E
of one search) and cascades (service/cascade.py), each with the accuracy and latency its export
measured. A request names one, gives a
latency budget, fixes the architecture itself, or takes the bundle's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service import architecture
from service.errors import ApiError
from service.manifest import Cascade, Controller, Manifest

# `architecture` values besides an explicit architecture code
AUTO, MOBILENET_V2, ALL = "auto", "mobilenet_v2", "all"


@dataclass(frozen=True)
class Choice:
    """What runs for a request: a controller's choice (`operating_point`), or a given `executed` matrix."""

    operating_point: str | None
    reason: str  # default | load | requested | budget | over_budget | architecture | static
    executed: np.ndarray | None = None  # (cells, modules) when the architecture is given


def mean_latency_ms(point: Controller | Cascade) -> float | None:
    """The point's measured mean per-image latency (estimated where it was not measured)."""
    e = point.evaluation
    if e is None:
        return None
    return e.mean_measured_latency_ms if e.mean_measured_latency_ms is not None else e.mean_estimated_latency_ms


def top1(point: Controller | Cascade) -> float:
    """The accuracy a choice ranks the point by: its validation top-1 (its test top-1 in a bundle
    exported without validation figures)."""
    return point.validation.top1 if point.validation is not None else point.evaluation.top1


def by_budget(manifest: Manifest, max_latency_ms: float) -> tuple[str, str]:
    """The most accurate point on validation whose mean measured latency fits the budget; the
    fastest one if none does. Latency is the executor's measured mean (the test split's images):
    what the point will cost, not a choice made on test accuracy."""
    measured = [(p, mean_latency_ms(p)) for p in manifest.points if mean_latency_ms(p) is not None]
    if not measured:
        raise ApiError(422, "no_measured_operating_points",
                       "this bundle's operating points carry no measured latency, so max_latency_ms cannot be applied")
    fitting = [p for p, ms in measured if ms <= max_latency_ms]
    if fitting:
        return max(fitting, key=lambda p: (top1(p), -mean_latency_ms(p))).name, "budget"
    return min(measured, key=lambda t: t[1])[0].name, "over_budget"


def choose(manifest: Manifest, *, operating_point: str | None = None, max_latency_ms: float | None = None,
           architecture_code: str | None = None, governor=None) -> Choice:
    """Resolve a request's options; raises ApiError (422) for options that do not fit the bundle.
    With none of them, the bundle's default answers, or `governor`'s (service.governor) under load."""
    space = manifest.search_space
    names = manifest.point_names
    given = architecture_code not in (None, "", AUTO)
    if given and (operating_point or max_latency_ms is not None):
        raise ApiError(422, "conflicting_options", "architecture fixes what runs; do not combine it with "
                       "operating_point or max_latency_ms")
    if operating_point and max_latency_ms is not None:
        raise ApiError(422, "conflicting_options", "give operating_point or max_latency_ms, not both")
    if given:
        if architecture_code == MOBILENET_V2:
            matrix = architecture.mobilenet_v2(space)
        elif architecture_code == ALL:
            matrix = np.ones((space.num_cells, space.num_modules), bool)
        else:
            try:
                matrix = architecture.decode(architecture_code, space.num_cells, space.num_modules)
            except ValueError as exc:
                raise ApiError(422, "invalid_architecture",
                               f"{exc}; use auto, {MOBILENET_V2}, {ALL} or a code as /classify returns it") from None
        return Choice(None, "architecture", matrix)
    if not names:
        if operating_point or max_latency_ms is not None:
            raise ApiError(422, "unknown_operating_point", "this bundle is static (one architecture); "
                           "it has no operating points")
        return Choice(None, "static")
    if operating_point:
        if operating_point not in names:
            raise ApiError(422, "unknown_operating_point",
                           f"operating point {operating_point!r} is not in this bundle; choose one of {', '.join(names)}")
        return Choice(operating_point, "requested")
    if max_latency_ms is not None:
        return Choice(*by_budget(manifest, max_latency_ms))
    if governor is not None:
        return Choice(*governor.current())
    return Choice(manifest.point_name(None), "default")
