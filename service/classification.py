"""The request path of `/classify` below HTTP: admission, decoding, the executor, the response.

`Classification` works on bytes already read, so it can be imported and driven in-process;
`routes/classify.py` only turns HTTP into these calls.
"""

from __future__ import annotations

import time

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import architecture, imaging
from service.errors import ApiError
from service.operating_points import Choice
from service.schemas import Architecture, CellChoice, ClassifyResponse, ClassScore, Latency, OperatingPointChoice
from service.state import ServiceState

_IMAGE_ERROR_STATUS = {"image_too_large": 413, "unsupported_image_format": 415}


def admit(state: ServiceState) -> None:
    """Refuse at once, before reading the body, when the queue is full."""
    if state.waiting >= state.settings.max_queue and state.slots.locked():
        raise ApiError(503, "overloaded", "the server is at capacity; retry later", {"Retry-After": "1"})


def image_error(exc: imaging.ImageError) -> ApiError:
    status = getattr(exc, "status", None) or _IMAGE_ERROR_STATUS.get(exc.code, 400)
    return ApiError(status, exc.code, str(exc))


def prepare(state: ServiceState, body: bytes) -> np.ndarray:
    """Image bytes -> the bundle's (3, H, W) float32 input."""
    pre = state.manifest.preprocessing
    image = imaging.decode(body, max_pixels=state.settings.max_pixels)
    return imaging.to_input(imaging.to_pixels(image, pre.input_size), pre)


async def classify(state: ServiceState, body: bytes, choice: Choice, top_k: int, t_start: float) -> ClassifyResponse:
    """Decode and classify one image, waiting for an executor slot; observes the metrics."""
    metrics = state.metrics
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
            x = await run_in_threadpool(prepare, state, body)
        except imaging.ImageError as exc:
            raise image_error(exc) from None
        t_run = time.perf_counter()
        executed = None if choice.executed is None else choice.executed[None]
        result = await run_in_threadpool(state.executor.run, x[None], executed, choice.operating_point)
    finally:
        metrics.in_flight.dec()
        state.slots.release()
    t_end = time.perf_counter()
    stages = {"decode": t_run - t_decode, "queue": t_decode - t_queue, **result.seconds}
    return respond(state, result, 0, choice, top_k, stages, t_end - t_start)


def respond(state: ServiceState, result, row: int, choice: Choice, top_k: int, stages: dict[str, float],
            total_s: float) -> ClassifyResponse:
    """One image's response from row `row` of an executor result; observes its metrics."""
    metrics, costs = state.metrics, state.costs
    executed = result.executed[row]
    latency_ms = float(costs.latency_ms(executed[None], result.operating_point)[0])
    mflops = float(costs.mflops(executed[None], result.operating_point)[0])
    metrics.batch_size.observe(len(result.executed))
    metrics.observe_architecture(executed, latency_ms, mflops)
    metrics.operating_points.labels(choice.operating_point or "", choice.reason).inc()
    for stage, seconds in stages.items():
        metrics.stage_duration.labels(stage).observe(seconds)
    classes = state.manifest.classes
    probs = result.probabilities[row]
    order = np.argsort(-probs, kind="stable")[:top_k]
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
            relative_to_baseline=round(latency_ms / costs.baseline_ms, 4),
        ),
        operating_point=OperatingPointChoice(name=choice.operating_point, reason=choice.reason),
        latency_ms=Latency(**{stage: round(v * 1e3, 4) for stage, v in stages.items()}, total=round(total_s * 1e3, 4)),
    )
