"""Microseconds per POST /classify in process: instanas-serve's app against the naive app (service/naive.py).

    .venv/bin/python scripts/inprocess_naive.py [--model models/cifar10-default-mobilenet_v2] [--requests 1000] [--rounds 5]

Both apps run in this process behind httpx's ASGI transport (no sockets, no uvicorn), on the same
static bundle and the same real test JPEG, one request at a time; the rounds alternate between the
apps and the median round is printed. What is left between the two is the app's own request path:
middlewares, parameters, admission, batching, metrics, the response.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import httpx  # noqa: E402

from service import naive  # noqa: E402
from service.bench import read_jpegs  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402


async def round_us(client: httpx.AsyncClient, image: bytes, requests: int) -> float:
    t0 = time.perf_counter()
    for _ in range(requests):
        response = await client.post("/classify", content=image, headers={"content-type": "image/jpeg"})
        if response.status_code != 200:
            raise SystemExit(f"POST /classify answered {response.status_code}: {response.text[:200]}")
    return (time.perf_counter() - t0) / requests * 1e6


async def measure(model: Path, image: bytes, requests: int, rounds: int) -> dict[str, float]:
    apps = {"instanas": create_app(Settings(model=str(model))), "naive": naive.create_app(str(model))}
    times: dict[str, list[float]] = {name: [] for name in apps}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, app in apps.items():  # one lifespan and client each, for all its rounds
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients[name] = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app"))
            await round_us(clients[name], image, 100)  # warm-up
        for _ in range(rounds):
            for name, client in clients.items():
                times[name].append(await round_us(client, image, requests))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10-default-mobilenet_v2")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test.tar.gz")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(measure(args.model, read_jpegs(args.data, None)[0], args.requests, args.rounds))
    print(f"instanas {result['instanas']:.0f} us a request, naive {result['naive']:.0f} us "
          f"(naive / instanas {result['naive'] / result['instanas']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
