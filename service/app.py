"""The HTTP API: `POST /classify`, health, model info and Prometheus metrics.

`create_app(settings)` loads and verifies the bundle before anything is served, so a
broken bundle fails at start-up, not on the first request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import architecture, imaging
from service.bundle import Bundle, load_bundle
from service.executor import Executor
from service.metrics import Metrics
from service.schemas import (
    Architecture,
    CellChoice,
    ClassifyResponse,
    ClassScore,
    ErrorResponse,
    Health,
    Latency,
    ModelRef,
)
from service.settings import Settings

log = logging.getLogger("instanas.service")

_MULTIPART = "multipart/form-data"
_OCTET_STREAM = "application/octet-stream"
ACCEPTED_MEDIA_TYPES = sorted(imaging.SUPPORTED_MEDIA_TYPES | {_MULTIPART, _OCTET_STREAM})
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)}
_IMAGE_ERROR_STATUS = {"image_too_large": 413, "unsupported_image_format": 415}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(error={"code": code, "message": message}).model_dump(), status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection before the body ended") from None
    return b"".join(chunks)


async def _file_from_multipart(headers: Headers, body: bytes) -> bytes:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"the multipart body could not be parsed: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_file", "the multipart body has no file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


class _State:
    """What the app holds while it serves: bundle, executor, metrics and the queue."""

    def __init__(self, settings: Settings, bundle: Bundle):
        self.settings = settings
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.executor = Executor(bundle)
        self.costs = architecture.CostTable(bundle.manifest)
        space = bundle.manifest.search_space
        self.metrics = Metrics(space.num_cells, space.num_modules)
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.waiting = 0
        self.ready = False
        self.model_ref = ModelRef(name=self.manifest.name, version=self.manifest.version, sha256=bundle.sha256)
        self.metrics.model_info.labels(self.manifest.name, self.manifest.version, bundle.sha256).set(1)


def create_app(settings: Settings | None = None, bundle: Bundle | None = None) -> FastAPI:
    settings = settings or Settings()
    bundle = bundle or load_bundle(settings.model, intra_op_threads=settings.intra_op_threads)
    state = _State(settings, bundle)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.ready = True
        yield
        state.ready = False

    app = FastAPI(title="instanas", version="0.1.0", lifespan=lifespan,
                  description="Instance-aware NAS: each image runs the architecture its controller picks.")
    app.state.instanas = state
    metrics = state.metrics

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        metrics.rejections.labels("invalid_request").inc()
        return _error(422, "invalid_request", details)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, "internal_error", "the server failed to handle this request; see its log")

    @app.middleware("http")
    async def _count_requests(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
            status = response.status_code
        except Exception:
            status = 500
            raise
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.post("/classify", response_model=ClassifyResponse, responses=_ERRORS,
              summary="Classify one image with the architecture the controller picks for it",
              openapi_extra={"requestBody": {"required": True, "content": {
                  **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(imaging.SUPPORTED_MEDIA_TYPES)},
                  _MULTIPART: {"schema": {"type": "object", "required": ["file"],
                                          "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
    async def classify(request: Request, top_k: int | None = Query(None, ge=1, description="How many classes to list.")):
        t_start = time.perf_counter()
        try:
            return await _classify(request, top_k, t_start)
        except ApiError as exc:
            metrics.rejections.labels(exc.code).inc()
            raise

    async def _classify(request: Request, top_k: int | None, t_start: float) -> ClassifyResponse:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ACCEPTED_MEDIA_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"content type {media_type or '(none)'} is not accepted; send one of {', '.join(ACCEPTED_MEDIA_TYPES)}")
        classes = state.manifest.classes
        k = top_k or min(settings.default_top_k, len(classes))
        if k > len(classes):
            raise ApiError(422, "invalid_request", f"top_k is {k}, but the model has {len(classes)} classes")
        # Admission first: a full server refuses before reading or decoding anything.
        if state.waiting >= settings.max_queue and state.slots.locked():
            raise ApiError(503, "overloaded", "the server is at capacity; retry later")
        body = await _read_body(request, settings.max_body_bytes)
        if media_type == _MULTIPART:
            body = await _file_from_multipart(request.headers, body)
        t_queue = time.perf_counter()
        state.waiting += 1
        metrics.queue_depth.inc()
        try:
            await state.slots.acquire()
        finally:
            state.waiting -= 1
            metrics.queue_depth.dec()
        # Decoding runs inside the slot too, so at most max_concurrency decoded images exist at once.
        t_decode = time.perf_counter()
        metrics.in_flight.inc()
        try:
            try:
                x = await run_in_threadpool(_prepare, body)
            except imaging.ImageError as exc:
                raise ApiError(_IMAGE_ERROR_STATUS.get(exc.code, 400), exc.code, str(exc)) from None
            t_run = time.perf_counter()
            result = await run_in_threadpool(state.executor.run, x[None])
        finally:
            metrics.in_flight.dec()
            state.slots.release()
        t_end = time.perf_counter()
        metrics.batch_size.observe(1)
        executed = result.executed[0]
        latency_ms = float(state.costs.latency_ms(result.executed)[0])
        mflops = float(state.costs.mflops(result.executed)[0])
        metrics.observe_architecture(executed, latency_ms, mflops)
        stages = {"decode": t_run - t_decode, "queue": t_decode - t_queue, **result.seconds}
        for stage, seconds in stages.items():
            metrics.stage_duration.labels(stage).observe(seconds)
        probs = result.probabilities[0]
        order = np.argsort(-probs, kind="stable")[:k]
        scores = [ClassScore(index=int(i), label=classes[i], probability=float(probs[i])) for i in order]
        space = state.manifest.search_space
        return ClassifyResponse(
            model=state.model_ref,
            prediction=scores[0],
            top_k=scores,
            architecture=Architecture(
                code=architecture.encode(executed),
                cells=[CellChoice(cell=c.index, modules=[c.modules[m].name for m in np.flatnonzero(executed[c.index])])
                       for c in space.cells],
                modules_executed=int(executed.sum()),
                mflops=round(mflops, 4),
                estimated_latency_ms=round(latency_ms, 4),
                relative_to_baseline=round(latency_ms / state.costs.baseline_ms, 4),
            ),
            latency_ms=Latency(**{stage: round(v * 1e3, 4) for stage, v in stages.items()},
                               total=round((t_end - t_start) * 1e3, 4)),
        )

    def _prepare(body: bytes) -> np.ndarray:
        image = imaging.decode(body, max_pixels=settings.max_pixels)
        pre = state.manifest.preprocessing
        return imaging.to_input(imaging.to_pixels(image, pre.input_size), pre)

    @app.get("/healthz/live", response_model=Health, summary="The process is up")
    async def live():
        return Health(status="ok")

    @app.get("/healthz/ready", response_model=Health, responses={503: {"model": Health}},
             summary="The bundle is loaded and verified; requests are served")
    async def ready():
        if not state.ready:
            return JSONResponse(Health(status="starting").model_dump(), status_code=503)
        return Health(status="ready", model=state.model_ref)

    @app.get("/model", summary="The served bundle's manifest")
    async def model():
        return {"sha256": state.bundle.sha256, **state.manifest.model_dump(mode="json")}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
