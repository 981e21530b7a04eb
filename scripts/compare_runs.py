"""Two runs' operating points on validation at equal latency (the table in docs/RESULTS.md).

    .venv/bin/python scripts/compare_runs.py docs/runs/cifar10-bnsearch docs/runs/cifar10-taught

For each point of the first run: its validation top-1 after fine-tuning (batch-norm
re-estimated) at its estimated latency, from `log.jsonl`, and the second run's top-1 at that
latency, interpolated linearly between its two neighbouring points (outside its range:
extrapolated from its two nearest, and marked so).
"""

from __future__ import annotations

import json
import sys
from itertools import pairwise
from pathlib import Path


def final_points(run: str) -> dict[str, tuple[float, float]]:
    """{point: (estimated latency ms, validation top-1)} from the last fine-tuning of the run."""
    points = {}
    for line in (Path(run) / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["phase"] == "finetune" and "variant" in r and "val_top1" in r:
            points[r["variant"]] = (r["val_latency_ms"], r["val_top1"])
    return points


def at_latency(points: list[tuple[float, float]], ms: float) -> tuple[float, bool]:
    """(top-1 at `ms` on the line through the two points around it, whether that is outside them)."""
    points = sorted(points)
    inside = points[0][0] <= ms <= points[-1][0]
    pairs = list(pairwise(points))
    (x0, y0), (x1, y1) = next((p for p in pairs if p[0][0] <= ms <= p[1][0]),
                              pairs[0] if ms < points[0][0] else pairs[-1])
    return y0 + (y1 - y0) * (ms - x0) / (x1 - x0), not inside


def main(first: str, second: str) -> int:
    ours, theirs = final_points(first), list(final_points(second).values())
    print(f"| point | estimated ms | {Path(first).name} | {Path(second).name} at that latency | difference |")
    print("| --- | --- | --- | --- | --- |")
    for name, (ms, top1) in ours.items():
        other, outside = at_latency(theirs, ms)
        mark = " (extrapolated)" if outside else ""
        print(f"| {name} | {ms:.3f} | {100 * top1:.2f} | {100 * other:.2f}{mark} | {100 * (top1 - other):+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
