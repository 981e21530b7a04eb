"""The app factory: settings and a verified bundle in, a FastAPI app with its routers out.

`create_app(settings)` loads and verifies the bundle before anything is served, so a
broken bundle fails at start-up, not on the first request. Routes live in
`service/routes/`, one file per resource; they reach the bundle, executor and metrics
through the `State` dependency (`service/state.py`).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors
from service.bundle import Bundle, load_bundle
from service.metrics import Metrics
from service.routes import classify, health, model, monitoring
from service.settings import Settings
from service.state import ServiceState


class RequestMetrics:
    """Counts every request by route and status, and times it: a plain ASGI middleware
    (Starlette's BaseHTTPMiddleware adds a task and a stream per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)


def create_app(settings: Settings | None = None, bundle: Bundle | None = None) -> FastAPI:
    settings = settings or Settings()
    bundle = bundle or load_bundle(settings.model, intra_op_threads=settings.intra_op_threads)
    state = ServiceState(settings, bundle)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.stop()

    app = FastAPI(title="instanas", version="0.1.0", lifespan=lifespan,
                  description="Instance-aware NAS: each image runs the architecture its controller picks.")
    app.state.instanas = state
    errors.install(app, lambda code: state.metrics.rejections.labels(code).inc())
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    for router in (classify.router, health.router, model.router, monitoring.router):
        app.include_router(router)
    return app
