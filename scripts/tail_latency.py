"""Where the tail of a concurrent load goes: client latency against the responses' own breakdown.

    INSTANAS_WORKERS=2 INSTANAS_MAX_CONCURRENCY=1 .venv/bin/python scripts/tail_latency.py \
        --model models/cifar10-default --data ../shared/data/cifar10-jpeg/test.tar.gz

Starts a real `instanas-serve` (the settings come from the environment, as for `instanas-bench`),
sends `--requests` classifications over `--concurrency` keep-alive connections, and prints p50 and
p99 of the client's latency and of every stage of the response's `latency_ms` (decode, queue,
controller, backbone, total). A total whose p99 is far above every stage's p99 is time the
handler spent outside the stages it measures (docs/RESULTS.md, "Start-up's objects frozen out of garbage collection").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/cifar10-default")
    parser.add_argument("--data", required=True, help="a tar(.gz) of <class>/<image> JPEGs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8000)
    args = parser.parse_args()
    jpegs = bench.read_jpegs(Path(args.data), 300)
    server = bench._Server(Path(args.model), {})
    bodies: list[bytes] = []
    try:
        bench._load(server.port, jpegs, 4, 300)  # warm-up, as instanas-bench does
        client = bench._load(server.port, jpegs, args.concurrency, args.requests, on_body=bodies.append)
    finally:
        server.stop()
    print(f"{args.requests} requests at concurrency {args.concurrency}: {client['throughput_rps']:.0f} req/s, "
          f"{client['errors']} errors")
    print(f"{'client':<18} p50 {client['p50_ms']:7.2f} ms   p99 {client['p99_ms']:7.2f} ms   "
          f"p99/p50 {client['p99_ms'] / client['p50_ms']:5.2f}")
    stages = [json.loads(body)["latency_ms"] for body in bodies]
    rows = {}
    for key in ("decode", "queue", "controller", "backbone", "total"):
        rows[f"server {key}"] = np.array([s[key] for s in stages])
    for name, ms in rows.items():
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        print(f"{name:<18} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   p99/p50 {p99 / p50:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
