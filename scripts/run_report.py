"""Print a training run's log.jsonl as Markdown tables (the per-epoch figures in docs/RESULTS.md and docs/history/).

    .venv/bin/python scripts/run_report.py docs/runs/cifar10-default

One table per phase: its epochs (baseline, pretrain, finetune), or its finished operating points
(search), with every figure the log holds for them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_SKIP = {"time", "phase", "status"}


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rows(records: list[dict], phase: str) -> list[dict]:
    if phase == "search":
        return [r for r in records if r["phase"] == phase and r.get("status") == "variant done"]
    return [r for r in records if r["phase"] == phase and "epoch" in r]


def main(run: str) -> int:
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    for phase in dict.fromkeys(r["phase"] for r in records):
        rows = _rows(records, phase)
        if not rows:
            continue
        columns = list(dict.fromkeys(k for r in rows for k in r if k not in _SKIP))
        print(f"\n{phase}\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for r in rows:
            print("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    done = {r["phase"]: r["seconds"] for r in records if r.get("status") == "done"}
    if done:
        print("\nphase wall time (s): " + ", ".join(f"{p} {s:.0f}" for p, s in done.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/runs/cifar10-default"))
