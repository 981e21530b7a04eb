"""The naive server the benchmark holds instanas-serve to: FastAPI and one onnxruntime session.

    python -m service.naive --model models/cifar10-default-mobilenet_v2 --port 8001 [--workers N]

What a user would write in twenty lines to serve a static bundle: the bundle's graphs composed
into one (service/fused.py, as instanas-serve's fused cache does), one session with the same
options, `POST /classify` decoding the body with Pillow (service/imaging.py, JPEG draft scaling
included: instanas-serve's own decoding of every image but a plain JPEG of the input's size,
which it reads with libjpeg-turbo directly, imaging.jpeg_pixels) and answering the top class. No
limits, metrics, logs, batching, admission, governor or reload. uvicorn with uvloop and httptools where installed, as instanas-serve.
`instanas-bench --naive` runs it beside instanas-serve and reports every figure as a ratio to it.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response

from service import architecture, imaging
from service.bundle import load_bundle
from service.fused import GraphLibrary, build
from service.server import fast_server


def create_app(model: str) -> FastAPI:
    bundle = load_bundle(model)
    manifest = bundle.manifest
    if manifest.fixed_architecture is None:
        raise SystemExit(f"{model}: the naive server serves a static bundle (one fixed architecture)")
    space = manifest.search_space
    executed = architecture.decode(manifest.fixed_architecture, space.num_cells, space.num_modules)
    graph = build(GraphLibrary(bundle), space, architecture.apply_empty_cell_rule(executed[None], space)[0])
    pre, classes = manifest.preprocessing, manifest.classes
    app = FastAPI()

    @app.get("/healthz/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/classify")
    async def classify(request: Request) -> Response:
        pixels = imaging.to_pixels(imaging.decode(await request.body(), target_size=pre.input_size), pre.input_size)
        logits = graph(imaging.to_input(pixels, pre)[None])[0]
        p = np.exp(logits - logits.max())
        top = int(p.argmax())
        return Response(json.dumps({"label": classes[top], "probability": float(p[top] / p.sum())}),
                        media_type="application/json")

    return app


MODEL_VARIABLE = "INSTANAS_NAIVE_MODEL"  # the bundle of each worker process, with --workers


def app_from_environment() -> FastAPI:
    """The app of one worker process (uvicorn's `--workers` imports the app in each)."""
    return create_app(os.environ[MODEL_VARIABLE])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="processes, as `uvicorn --workers` starts them")
    args = parser.parse_args(argv)
    options = {"host": args.host, "port": args.port, "log_level": "warning", "access_log": False, **fast_server()}
    if args.workers > 1:
        os.environ[MODEL_VARIABLE] = args.model
        uvicorn.run("service.naive:app_from_environment", factory=True, workers=args.workers, **options)
    else:
        uvicorn.run(create_app(args.model), **options)


if __name__ == "__main__":
    main()
