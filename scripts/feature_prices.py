"""What each feature of the request path costs: instanas-serve with one feature off at a time.

    .venv/bin/python scripts/feature_prices.py --model models/cifar10-default-mobilenet_v2 \
        --data ../shared/data/cifar10-jpeg/test.tar.gz [--requests 2000] [--rounds 3]

Starts the naive server (service/naive.py) and one instanas-serve per variant below, all on the
same static bundle, one process each, then runs every variant at concurrency 1 and 32 in turn,
`--rounds` times (the median round is reported, so a variant is never timed alone against a
busier machine). A feature's price is what turning it off gains, as a share of the naive
server's throughput. Variants are settings a user has (service/settings.py):

- defaults: every feature on, as `make serve` runs;
- no access log: INSTANAS_ACCESS_LOG=false;
- no batching: INSTANAS_MAX_BATCH_SIZE=1, INSTANAS_MAX_BATCH_DELAY_MS=0;
- no governor: INSTANAS_QUEUE_TARGET_MS=0;
- no fused cache: INSTANAS_FUSED_CACHE_SIZE=0 (the per-block path: what fusing saves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from service.bench import _load, _Server, read_jpegs

VARIANTS = {
    "defaults": {},
    "no access log": {"INSTANAS_ACCESS_LOG": "false"},
    "no batching": {"INSTANAS_MAX_BATCH_SIZE": "1", "INSTANAS_MAX_BATCH_DELAY_MS": "0"},
    "no governor": {"INSTANAS_QUEUE_TARGET_MS": "0"},
    "no fused cache": {"INSTANAS_FUSED_CACHE_SIZE": "0"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/cifar10-default-mobilenet_v2"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    jpegs = read_jpegs(args.data, 500)
    levels = [int(c) for c in args.concurrency.split(",")]
    # _Server sets INSTANAS_ACCESS_LOG=false for the benchmark; the defaults put it back on
    servers = {"naive": _Server(args.model, {}, naive=True),
               **{name: _Server(args.model, {"INSTANAS_ACCESS_LOG": "true", **env}) for name, env in VARIANTS.items()}}
    try:
        for server in servers.values():
            _load(server.port, jpegs, 4, 300)
        runs: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            for c in levels:
                for name, server in servers.items():
                    result = _load(server.port, jpegs, c, args.requests)
                    if result["errors"]:
                        raise SystemExit(f"{name} at concurrency {c}: {result['errors']} errors")
                    runs.setdefault((name, c), []).append(result["throughput_rps"])
                    print(f"round {r + 1}: {name} at {c}: {result['throughput_rps']:.0f}/s", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    median = {key: statistics.median(values) for key, values in runs.items()}
    print(f"{'variant':<16}" + "".join(f" {'c=' + str(c) + ' /s':>10} {'x naive':>8} {'price':>7}" for c in levels))
    for name in servers:
        cells = ""
        for c in levels:
            naive, this, default = median[("naive", c)], median[(name, c)], median[("defaults", c)]
            price = "" if name in ("naive", "defaults") else f"{(this - default) / naive:+.2f}"
            cells += f" {this:>10.0f} {this / naive:>8.2f} {price:>7}"
        print(f"{name:<16}{cells}")
    if args.json:
        args.json.write_text(json.dumps({f"{name} c={c}": v for (name, c), v in runs.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
