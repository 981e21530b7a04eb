"""How a running server's worker processes share keep-alive connections.

    INSTANAS_WORKERS=2 instanas-serve --model models --port 8766 &
    python scripts/worker_connections.py --url http://127.0.0.1:8766 --image cat.jpg

Opens `--connections` keep-alive connections at once, sends `--requests` classifications on
each, then counts with `ss -tnp` which process owns each connection (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
from urllib.parse import urlsplit

import httpx


async def share(url: str, image: bytes, connections: int, requests: int) -> collections.Counter:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one() -> None:
            for _ in range(requests):
                await client.post(url + "/classify", content=image, headers={"content-type": "image/jpeg"})

        await asyncio.gather(*[one() for _ in range(connections)])
        return await asyncio.to_thread(owners, urlsplit(url).port)  # while the connections are still open


def owners(port: int) -> collections.Counter:
    """Established connections to `port`, counted by the pid that owns each."""
    listing = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
    return collections.Counter(line.split("pid=")[1].split(",")[0] for line in listing.splitlines() if "pid=" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", required=True, help="a JPEG file")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per connection")
    args = parser.parse_args()
    with open(args.image, "rb") as f:
        image = f.read()
    counts = asyncio.run(share(args.url.rstrip("/"), image, args.connections, args.requests))
    print("connections per worker pid:", dict(counts))


if __name__ == "__main__":
    main()
