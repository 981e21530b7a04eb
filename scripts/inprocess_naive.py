"""Microseconds per POST /classify in process: instanas-serve's app against the naive app (service/naive.py).

    .venv/bin/python scripts/inprocess_naive.py [--model models/cifar10-default-mobilenet_v2] \
        [--requests 200] [--rounds 40]

Both apps run in this process, called as ASGI applications with nothing between (no sockets, no
uvicorn, no HTTP client), on the same static bundle and the same real test JPEG, one request at a
time; the event loop turns between requests, as a server's does. instanas-serve's app writes its
access log (to stderr, as a server does; run with 2>/dev/null). Rounds alternate between the two
apps; each figure is the median over the rounds, and each gap the median of the rounds' own
differences, so a machine that changes speed between rounds moves no gap. Two times a request:

- sent: from the call until the last byte of the response is handed to the server, what the
  client waits for;
- total: until the app returns, with what it does after the response (the access line, the
  metrics it makes after the response) and the loop's turn.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from service import logs, naive  # noqa: E402
from service.app import create_app  # noqa: E402
from service.bench import read_jpegs  # noqa: E402
from service.settings import Settings  # noqa: E402


async def one_round(app, image: bytes, requests: int) -> tuple[float, float]:
    """(median microseconds until the response is sent, mean microseconds a request) over `requests` calls."""
    headers = [(b"host", b"app"), (b"content-type", b"image/jpeg"), (b"content-length", str(len(image)).encode())]
    sent_us: list[float] = []
    t0 = 0.0

    async def receive():
        return {"type": "http.request", "body": image, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise SystemExit(f"POST /classify answered {message['status']}")
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            sent_us.append((time.perf_counter() - t0) * 1e6)

    start = time.perf_counter()
    for _ in range(requests):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/classify", "raw_path": b"/classify", "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
                 "server": ("127.0.0.1", 8000), "state": {}}
        t0 = time.perf_counter()
        await app(scope, receive, send)
        await asyncio.sleep(0)  # the loop's turn between requests
    return statistics.median(sent_us), (time.perf_counter() - start) / requests * 1e6


async def measure(model: Path, image: bytes, requests: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    apps = {"instanas": create_app(Settings(model=str(model), access_log=True)), "naive": naive.create_app(str(model))}
    times = {name: {"sent": [], "total": []} for name in apps}
    async with apps["instanas"].router.lifespan_context(apps["instanas"]):
        for app in apps.values():
            await one_round(app, image, 100)  # warm-up
        for _ in range(rounds):
            for name, app in apps.items():
                sent, total = await one_round(app, image, requests)
                times[name]["sent"].append(sent)
                times[name]["total"].append(total)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10-default-mobilenet_v2")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test.tar.gz")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    logs.configure("json", "info")  # as instanas-serve logs
    times = asyncio.run(measure(args.model, read_jpegs(args.data, 1)[0], args.requests, args.rounds))
    ours, theirs = times["instanas"], times["naive"]
    for what in ("sent", "total"):
        gap = statistics.median(a - b for a, b in zip(ours[what], theirs[what]))
        print(f"{what:5s}: instanas {statistics.median(ours[what]):.0f} us, naive {statistics.median(theirs[what]):.0f} us,"
              f" instanas - naive {gap:+.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
