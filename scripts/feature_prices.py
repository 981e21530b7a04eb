"""What each feature of the request path costs: instanas-serve with one feature off at a time.

    .venv/bin/python scripts/feature_prices.py --data ../shared/data/cifar10-jpeg/test.tar.gz \
        [--model models/cifar10-default-mobilenet_v2] [--requests 2000] [--rounds 5]

Starts the naive server (service/naive.py) and one instanas-serve per variant below, all on the
same bundle, one process each, then runs every level (concurrency 1 and 32) on every server in
turn, `--rounds` times. Each figure is the median over the rounds of a ratio taken within a round
(`service.bench.paired`), so a machine that slows down between rounds moves no figure: `x naive`,
the variant's throughput over the naive server's; `price`, what turning the feature off gains, as
a share of the naive server's throughput (the variant's throughput minus the defaults', over the
naive server's).

Some features are settings a user has (service/settings.py):

- defaults: every feature on, as `make serve` runs;
- no access log: INSTANAS_ACCESS_LOG=false;
- no batching: INSTANAS_MAX_BATCH_SIZE=1, INSTANAS_MAX_BATCH_DELAY_MS=0;
- no governor: INSTANAS_QUEUE_TARGET_MS=0;
- no fused cache: INSTANAS_FUSED_CACHE_SIZE=0 (the per-block path: what fusing saves).

The others have no setting, since a server without them is not one to run; for this benchmark
only, the server is started through this script (`--serve VARIANT`), which takes the feature
out before handing over to instanas-serve (`PATCHES`):

- no metrics: every Prometheus counter, gauge and histogram update does nothing;
- no limits: no admission control (the queue bound), no body limits (size, time, bytes held),
  no header time or size limit and no connection limit (the guard still counts the requests in
  progress, which the inline path asks for);
- plain response: the response is the naive server's, the top class and its probability (the
  metrics are still observed);
- no decode: every request is answered with the input of the first image the server decoded;
- decode in the executors: small JPEGs are decoded by the executor threads, as larger ones
  are, not on the event loop's thread (service/classification.py, `decoded_on_loop`); its price
  is what decoding on the loop gains, negative where it gains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from service.bench import _load, _Server, read_jpegs  # noqa: E402

VARIANTS = {  # name -> (environment, patch)
    "defaults": ({}, None),
    "no access log": ({"INSTANAS_ACCESS_LOG": "false"}, None),
    "no metrics": ({}, "no-metrics"),
    "no limits": ({}, "no-limits"),
    "no batching": ({"INSTANAS_MAX_BATCH_SIZE": "1", "INSTANAS_MAX_BATCH_DELAY_MS": "0"}, None),
    "no governor": ({"INSTANAS_QUEUE_TARGET_MS": "0"}, None),
    "plain response": ({}, "plain-response"),
    "no decode": ({}, "no-decode"),
    "decode in the executors": ({}, "executor-decode"),
    "no fused cache": ({"INSTANAS_FUSED_CACHE_SIZE": "0"}, None),
}


def _nothing(*args, **kwargs) -> None:
    return None


def no_metrics() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    for family, methods in ((Counter, ("inc",)), (Gauge, ("inc", "dec", "set")), (Histogram, ("observe",))):
        for method in methods:
            setattr(family, method, _nothing)


class _Unlimited:
    """A request's `receive` as it comes, with no body limits."""

    def __init__(self, receive):
        self.receive = receive

    async def __call__(self):
        return await self.receive()

    def release(self) -> None:
        pass


def no_limits() -> None:
    from service import classification, limits, server

    classification.admit = _nothing

    limits.BodyLimits.refusal = _nothing
    limits.BodyLimits.reader = lambda self, scope, receive, declared: _Unlimited(receive)
    # The connection guard stays to count connections with a request in progress (the inline path
    # asks how many there are) and the header bytes httptools parses (an addition and a comparison
    # a header, inline in its callbacks); its other limits go: no header timer, no connection limit.
    server.Guard._arm_header_timer = _nothing
    server.connection_limit = lambda wanted: 1 << 30


def plain_response() -> None:
    from service import classification

    def respond(state, result, row, request, stages, batch_s, batch_size, code=None, written=False) -> dict:
        classification.observe(state, result, row, request.choice, stages, code)
        probabilities = result.probabilities[row]
        top = int(probabilities.argmax())
        return {"label": state.manifest.classes[top], "probability": float(probabilities[top])}

    classification.respond = respond


def no_decode() -> None:
    from service import classification, imaging

    decode, normalise = classification.pixels, imaging.to_input
    held, inputs = [], {}

    def pixels(state, body: bytes):
        if not held:
            held.append(decode(state, body))
        return held[0]

    def to_input(x, pre):  # a batch of the held pixels: scaled and normalised once a shape
        if x.shape not in inputs:
            inputs[x.shape] = normalise(x, pre)
        return inputs[x.shape]

    classification.pixels = pixels
    imaging.to_input = to_input
    # the looks at the header before a decode (its size, its format) are decoding's too
    imaging.header_pixels = lambda data: 1
    imaging.plain_jpeg = lambda data: (1, 1)


def executor_decode() -> None:
    from service import classification

    classification.LOOP_DECODE_MAX_PIXELS = -1  # no image is small enough


PATCHES = {"no-metrics": no_metrics, "no-limits": no_limits, "plain-response": plain_response, "no-decode": no_decode,
           "executor-decode": executor_decode}


def serve(patch: str, argv: list[str]) -> int:
    """instanas-serve with `argv`, the feature `patch` names taken out first."""
    PATCHES[patch]()
    from service import cli

    return cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10-default-mobilenet_v2")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    jpegs = read_jpegs(args.data, 500)
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {"naive": _Server(args.model, {}, naive=True)}
    try:
        for name, (env, patch) in VARIANTS.items():
            command = None if patch is None else [sys.executable, str(Path(__file__).resolve()), "--serve", patch]
            # _Server sets INSTANAS_ACCESS_LOG=false for the benchmark; the defaults put it back on
            servers[name] = _Server(args.model, {"INSTANAS_ACCESS_LOG": "true", **env}, command=command)
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
    print(table(runs, list(servers), levels))
    if args.json:
        args.json.write_text(json.dumps({f"{name} c={c}": v for (name, c), v in runs.items()}, indent=2) + "\n")
    return 0


def table(runs: dict[tuple[str, int], list[float]], names: list[str], levels: list[int]) -> str:
    """Markdown: each variant's median throughput, and the medians of its rounds' ratios."""
    head = "| variant |" + "".join(f" c={c} images/s | x naive | price |" for c in levels)
    lines = [head, "|" + " --- |" * (1 + 3 * len(levels))]
    for name in names:
        cells = ""
        for c in levels:
            naive, this, default = runs[("naive", c)], runs[(name, c)], runs[("defaults", c)]
            ratio = statistics.median(t / n for t, n in zip(this, naive))
            price = "" if name in ("naive", "defaults") else \
                f"{statistics.median((t - d) / n for t, d, n in zip(this, default, naive)):+.2f}"
            cells += f" {statistics.median(this):.0f} | {ratio:.2f} | {price} |"
        lines.append(f"| {name} |{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
