"""Print a training run's log.jsonl as Markdown tables (the figures in docs/RESULTS.md).

    .venv/bin/python scripts/run_report.py runs/cifar10-default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = {
    "pretrain": ["epoch", "loss", "train_top1", "top1_all", "top1_mobilenet_v2", "top1_cheapest", "seconds"],
    "search": ["epoch", "upper_ms", "mean_reward", "test_top1", "test_latency_ms", "test_mflops", "test_modules", "seconds"],
    "finetune": ["epoch", "test_top1", "test_latency_ms", "test_mflops", "test_modules", "seconds"],
}


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(run: str) -> int:
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    for phase, columns in COLUMNS.items():
        rows = [r for r in records if r["phase"] == phase and "epoch" in r]
        if not rows:
            continue
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
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/cifar10-default"))
