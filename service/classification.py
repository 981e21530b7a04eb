"""The request path of `/classify` below HTTP: admission, batching, decoding, the executor, the response.

`Classification` works on bytes already read, so it can be imported and driven in-process;
`routes/classify.py` only turns HTTP into these calls.

A request's job goes to the app's `Batcher` (service/batching.py). A worker thread takes a
batch of jobs and, in that one thread hop, decodes every image, runs the executor once on
the batch (each controller once on the rows that asked for it, each fused architecture or
block once on the rows that ran it) and renders every response to JSON bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from service import architecture, imaging
from service.batching import Batcher, Job
from service.errors import ApiError
from service.operating_points import Choice

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover - orjson is in the serve extra
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Request:
    """What a worker needs to answer one request."""

    body: bytes
    choice: Choice
    top_k: int
    t_start: float  # perf_counter when the handler started


def admit(state) -> None:
    """Refuse at once, before reading the body, when the queue is full."""
    batcher = state.batcher
    if batcher.queued >= state.settings.max_queue and batcher.busy:
        raise ApiError(503, "overloaded", "the server is at capacity; retry later", {"Retry-After": "1"})


def image_error(exc: imaging.ImageError) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc))


def prepare(state, body: bytes) -> np.ndarray:
    """Image bytes -> the bundle's (3, H, W) float32 input."""
    pre = state.manifest.preprocessing
    image = imaging.decode(body, max_pixels=state.settings.max_pixels, target_size=pre.input_size)
    return imaging.to_input(imaging.to_pixels(image, pre.input_size), pre)


def make_batcher(state) -> Batcher:
    settings, metrics = state.settings, state.metrics

    def on_dispatch(n: int) -> None:
        metrics.in_flight.inc(n)

    def on_done(n: int) -> None:
        metrics.in_flight.dec(n)

    return Batcher(lambda jobs: process(state, jobs), workers=settings.max_concurrency,
                   max_batch_size=settings.max_batch_size, max_batch_delay_s=settings.max_batch_delay_ms / 1e3,
                   on_dispatch=on_dispatch, on_done=on_done, on_queue=metrics.queue_depth.inc)


async def classify(state, body: bytes, choice: Choice, top_k: int, t_start: float, *, expected: bool = False) -> bytes:
    """Classify one image (batched with concurrent ones); its response as JSON bytes.
    `expected`: the caller announced the request with `state.batcher.expect()` after admission."""
    job = await state.batcher.run(Request(body, choice, top_k, t_start), expected=expected)
    return job.result


def process(state, jobs: list[Job]) -> list:
    """A worker's batch: decode, run, render. One outcome per job: JSON bytes or an ApiError."""
    t0 = time.perf_counter()
    outcomes: list = [None] * len(jobs)
    inputs, rows = [], []
    for i, job in enumerate(jobs):
        try:
            inputs.append(prepare(state, job.payload.body))
            rows.append(i)
        except imaging.ImageError as exc:
            outcomes[i] = image_error(exc)
    if not rows:
        return outcomes
    t1 = time.perf_counter()
    requests = [jobs[i].payload for i in rows]
    result = state.executor.run_batch(np.stack(inputs), [r.choice.operating_point for r in requests],
                                      [r.choice.executed for r in requests])
    metrics = state.metrics
    metrics.batch_size.observe(len(rows))
    decode_s = t1 - t0
    codes = architecture.encode_many(result.executed)
    for row, i in enumerate(rows):
        job = jobs[i]
        stages = {"decode": decode_s, "queue": job.queue_s, **result.seconds}
        metrics.batch_wait.observe(job.batch_s)
        outcomes[i] = dumps(respond(state, result, row, job.payload, stages, job.batch_s, len(rows), codes[row]))
    return outcomes


def respond(state, result, row: int, request: Request, stages: dict[str, float], batch_s: float,
            batch_size: int, code: str | None = None) -> dict:
    """One image's response body (service.schemas.ClassifyResponse as plain JSON data) from row
    `row` of an executor result; observes its metrics."""
    metrics, costs = state.metrics, state.costs
    choice = request.choice
    executed = result.executed[row]
    point = result.point(row)
    latency_ms = float(costs.latency_ms(executed[None], point)[0])
    mflops = float(costs.mflops(executed[None], point)[0])
    metrics.observe_architecture(executed, latency_ms, mflops)
    metrics.operating_points.labels(choice.operating_point or "", choice.reason).inc()
    for stage, seconds in stages.items():
        metrics.stage_duration.labels(stage).observe(seconds)
    classes = state.manifest.classes
    probs = result.probabilities[row]
    order = np.argsort(-probs, kind="stable")[: request.top_k]
    scores = [{"index": int(i), "label": classes[i], "probability": float(probs[i])} for i in order]
    names = state.module_names
    latency = {stage: round(v * 1e3, 4) for stage, v in stages.items()}
    latency["total"] = round((time.perf_counter() - request.t_start) * 1e3, 4)
    latency["batch"] = round(batch_s * 1e3, 4)
    latency["batch_size"] = batch_size
    return {
        "model": state.model_json,
        "prediction": scores[0],
        "top_k": scores,
        "architecture": {
            "code": code or architecture.encode(executed),
            "cells": [{"cell": c, "modules": [names[c][m] for m in np.flatnonzero(executed[c])]}
                      for c in range(len(names))],
            "modules_executed": int(executed.sum()),
            "mflops": round(mflops, 4),
            "estimated_latency_ms": round(latency_ms, 4),
            "relative_to_baseline": round(latency_ms / costs.baseline_ms, 4),
        },
        "operating_point": {"name": choice.operating_point, "reason": choice.reason},
        "latency_ms": latency,
    }
