"""`instanas-serve --model <bundle or repository dir> --host <host> --port <port> [--workers N]`."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

from pydantic import ValidationError

from service import logs
from service.bundle import BundleError
from service.settings import Settings


def fast_server() -> dict[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools where installed (the serve extra),
    else asyncio and h11."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    return {"loop": "uvloop" if found["uvloop"] else "asyncio", "http": "httptools" if found["httptools"] else "h11"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instanas-serve", description="Serve instanas model bundles over HTTP. "
                                     "Every option can also be set as an INSTANAS_<NAME> environment variable.")
    parser.add_argument("--model", help="a model bundle folder, or a repository of them (default: the bundled models/)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000)")
    parser.add_argument("--default-model", help="in a repository, the model of requests that name none")
    parser.add_argument("--workers", type=int, help="server processes on the port (default 1)")
    parser.add_argument("--intra-op-threads", type=int, help="onnxruntime threads per graph run")
    parser.add_argument("--max-concurrency", type=int, help="executor threads (batches classified at the same time)")
    parser.add_argument("--log-level", help="log level (debug, info, warning, error)")
    parser.add_argument("--log-format", choices=["json", "text"], help="json (default): one JSON object a line; text")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"instanas-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)  # uvicorn's loggers included (log_config=None below)
    if settings.workers > 1:
        from service import workers  # a supervisor and its worker processes, each a whole server

        return workers.serve(settings)

    return run(settings)


def run(settings: Settings, sockets: list | None = None, on_serving=None) -> int:
    """Load every bundle and serve until a signal stops the server: on `settings`' host and port,
    or on `sockets` already bound (a worker's, service/workers.py). `on_serving()` is called once
    the server accepts requests and handles its signals. 2 when a bundle cannot be served."""
    from service import server  # uvicorn, with the limits it lacks and a draining shutdown
    from service.app import create_app

    try:
        app = create_app(settings)
    except BundleError as exc:
        print(f"instanas-serve: cannot serve the bundle: {exc}", file=sys.stderr, flush=True)
        return 2
    models = app.state.models
    for state in models.states.values():
        logging.getLogger("instanas.service").info(
            "serving %s %s (manifest sha256 %s%s) on http://%s:%d", state.manifest.name, state.manifest.version,
            state.bundle.sha256, ", the default" if state.name == models.default else "", settings.host, settings.port)
    # The access log is service.logs.AccessLog's (INSTANAS_ACCESS_LOG), not uvicorn's.
    server.serve(app, settings, sockets=sockets, on_serving=on_serving, host=settings.host, port=settings.port, log_level=settings.log_level,
                 access_log=False, log_config=None, **fast_server())
    return 0


if __name__ == "__main__":
    sys.exit(main())
