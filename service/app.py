"""The app factory: settings and a verified bundle in, a FastAPI app with its routers out.

`create_app(settings)` loads and verifies every bundle of `INSTANAS_MODEL` (one bundle, or a
model repository: service/repository.py) before anything is served, so a broken bundle fails
at start-up, not on the first request. Routes live in `service/routes/`, one file per
resource; they reach a model (bundle, executor, its metrics) through the `Models`
dependency (by name) or `State` (the default model). `app.state` holds the settings, the
process's metrics and the repository (`models`, which a reload swaps).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors, limits, logs, security, warmup
from service.bundle import Bundle
from service.envelope import Envelope
from service.metrics import Metrics
from service.repository import Repository, load_repository
from service.routes import admin, classify, demo, health, model, monitoring, v2
from service.settings import Settings
from service.state import ServiceState


def _version() -> str:
    """The installed package's version (pyproject.toml); a source tree run without installing has none."""
    try:
        return version("instanas")
    except PackageNotFoundError:
        return "0+unknown"


class App(FastAPI):
    """The service's FastAPI app. Its request envelope (service/envelope.py; `envelope`: the
    Envelope's keyword arguments) is the outermost layer of its middleware stack, outside the
    layers FastAPI puts first (Starlette's error layer, FastAPI's exception telemetry and body
    limit), so that POST /classify's fast path runs through none of them: each adds its
    coroutine, and the error layer a wrapper around `send`, to every request. Requests that go
    on to the routes still pass through all of them; the envelope answers (500) and logs an
    error that escapes the fast path, as the error layer does for the routes."""

    def __init__(self, *args, envelope: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.envelope = envelope

    def build_middleware_stack(self):
        return Envelope(super().build_middleware_stack(), **self.envelope)


def create_app(settings: Settings | None = None, bundle: Bundle | None = None, *,
               before_batch: Callable[[list], None] | None = None) -> App:
    """`bundle`: one bundle already loaded, served alone (tests and benchmarks); default: `settings.model`.

    `before_batch(jobs)`: called with each batch of requests (service/batching.py) where it runs,
    an executor thread or, for a lone small request, the event loop's thread, just before it is
    classified (and its images decoded, but for small ones, decoded on the loop before they were
    queued); raising fails the batch's requests. For tracing or fault injection:
    the tests hold batches with it, so that requests queue however fast the machine is. Every
    model gets it, those of later reloads too."""
    settings = settings or Settings()
    metrics = Metrics()
    if bundle is None:
        # Every graph runs once and the fused warm-up is done before anything is served (BundleError otherwise).
        models = load_repository(settings, metrics, before_batch=before_batch)
    else:
        state = ServiceState(settings, bundle, metrics, before_batch=before_batch)
        warmup.prepare(state)
        models = Repository(bundle.path, {state.name: state}, state.name)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # app.state.models, not `models`: a reload (service/reload.py) swaps it.
        # (warmup.prepare started each model: its fused builder is running.)
        _app.state.models.ready = True
        try:
            yield
        finally:
            current = _app.state.models
            current.ready = False
            current.stop()

    def on_rejection(code: str) -> None:
        metrics.rejections.labels(code).inc()

    # Outermost: every request's id, limits, request metrics and access line, and POST /classify's
    # fast path (service/envelope.py).
    body_limits = limits.BodyLimits(limits.ByteBudget(settings.max_buffered_bytes, on_change=metrics.bodies_held),
                                    max_body_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout,
                                    max_header_bytes=settings.max_header_bytes)
    envelope = {"metrics": metrics, "limits": body_limits, "access_log": logs.AccessLog(settings.access_log),
                "on_rejection": on_rejection, "cors": bool(settings.cors_origin_list)}
    app = App(title="instanas", version=_version(), lifespan=lifespan, envelope=envelope,
              description="Instance-aware NAS: each image runs the architecture its controller picks.")
    app.state.settings, app.state.metrics, app.state.models = settings, metrics, models
    app.state.before_batch = before_batch  # for the models of a reload (service/reload.py)
    models.mark_served(metrics)
    errors.install(app, on_rejection)
    security.install_cors(app, settings)  # off unless INSTANAS_CORS_ORIGINS is set
    # demo: the live demo page at GET / (service/static/); admin: POST /admin/reload
    for router in (classify.router, health.router, model.router, monitoring.router, v2.router, demo.router,
                   admin.router):
        app.include_router(router)
    limits.document_limits(app)
    return app
