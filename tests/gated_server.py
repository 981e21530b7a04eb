"""`python -m tests.gated_server --model M --host H --port P`: a one-process `instanas-serve` whose
batches wait at a gate the test closes and opens (`tests.conftest.Server(..., gated=True)`).

POST /test/hold: from then on every batch waits in its executor thread before it runs;
POST /test/release: they all go. So requests queue behind a busy executor for as long as the test
says, however fast or slow the machine is, not for as long as some work happens to take.
The gate is the app factory's `before_batch` hook (service/app.py); the rest is the real server.
"""

from __future__ import annotations

import argparse
import threading

from service import logs, server
from service.app import create_app
from service.settings import Settings

# A gate left closed (a test that failed while holding it) lets batches go after this, so the server can still stop.
HOLD_LIMIT_S = 120


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Batches always on the executor threads: one held on the event loop's thread (the inline path,
    # service/batching.py) would hold every request, these routes included.
    settings = Settings(model=args.model, host=args.host, port=args.port, inline_max_bytes=0)
    logs.configure(settings.log_format, settings.log_level)
    gate = threading.Event()
    gate.set()
    app = create_app(settings, before_batch=lambda jobs: gate.wait(HOLD_LIMIT_S))

    @app.post("/test/hold")
    async def hold() -> None:
        gate.clear()

    @app.post("/test/release")
    async def release() -> None:
        gate.set()

    server.serve(app, settings, host=settings.host, port=settings.port, log_level=settings.log_level,
                 access_log=False, log_config=None, **server.fast_server())


if __name__ == "__main__":
    main()
