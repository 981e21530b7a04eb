"""Round-trip time of three requests that do (almost) no model work, on a real server: what HTTP,
the app and the hand-off to the executor cost (docs/history/2026-11-29-serving-first-bundle.md,
"Worker processes, and the request path at concurrency 1").

    .venv/bin/python scripts/request_overhead.py [--model models/cifar10-default] [--requests 2000]

Prints the median ms of GET /healthz/live, GET /v2/health/live and a POST /classify whose 1-byte
body the decoder refuses (so it goes through admission, batching and the executor's decode step).
Set INSTANAS_INLINE_MAX_BYTES=0 to compare without the loop-thread path.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from service.bench import _free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar10-default"))
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    port = _free_port()
    serve = Path(sys.executable).with_name("instanas-serve")
    server = subprocess.Popen([str(serve), "--model", args.model, "--port", str(port)],
                              env={**os.environ, "INSTANAS_ACCESS_LOG": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                probe = http.client.HTTPConnection("127.0.0.1", port)
                probe.request("GET", "/healthz/ready")
                if probe.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for path, method, body in (("/healthz/live", "GET", None), ("/v2/health/live", "GET", None),
                                   ("/classify", "POST", b"x")):
            ms = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                conn.request(method, path, body=body, headers={"content-type": "image/jpeg"} if body else {})
                conn.getresponse().read()
                ms.append((time.perf_counter() - t0) * 1e3)
            print(f"{method} {path}: median {np.median(ms[len(ms) // 10:]):.3f} ms")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
