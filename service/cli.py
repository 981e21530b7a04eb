"""`instanas-serve --model <bundle or repository dir> --host <host> --port <port> [--workers N]`."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from service import logs
from service.settings import Settings


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

    from service import server  # uvicorn, with the limits it lacks and a draining shutdown

    return server.run(settings)


if __name__ == "__main__":
    sys.exit(main())
