"""The request path of `/classify` below HTTP: admission, batching, decoding, the executor, the response.

`Classification` works on bytes already read, so it can be imported and driven in-process;
`routes/classify.py` only turns HTTP into these calls.

A request's job goes to the app's `Batcher` (service/batching.py). A worker thread takes a
batch of jobs and, in that one thread hop, decodes every image still encoded, scales and
normalises the batch's pixels in one pass (`batch_of`), runs the executor once on the batch
(each controller once on the rows that asked for it, each fused architecture or block once on
the rows that ran it) and renders every response to JSON bytes.

Small plain JPEGs (`decoded_on_loop`: imaging.plain_jpeg, at most `INSTANAS_INLINE_MAX_BYTES` and
LOOP_DECODE_MAX_PIXELS) are decoded on the event loop's thread before the job is queued, so that
the worker threads run the model alone. Decoding is Python code around short native calls that
each give up the interpreter's lock; in the worker threads, under load, each such call then
waited for the lock held by the loop or the other worker, and at concurrency 32 the workers spent
most of a decode waiting (docs/RESULTS.md, "Decoding on the loop"). On the loop a small JPEG's
decode takes tens of microseconds (a plain JPEG of the input's size is read by libjpeg-turbo
directly, `pixels`), with no wait for the lock between its steps; its pixels are scaled and
normalised with the rest of the batch in the worker, one numpy pass a batch rather than one an
image on the loop. Only images whose decoding time those limits bound go there: a progressive JPEG of 64 KiB can repeat its scans thousands of
times, each a pass over the picture, and other formats and segments carry chunks (compressed
text, frames, metadata) that the pixel count does not bound; those are decoded by the workers,
as a client could otherwise hold the loop with them.

A request may carry several images (`Request.images`: encoded bytes, inputs already in the
bundle's (3, H, W) float32 form, as the Open Inference Protocol's FP32 tensors are, or (H, W, 3)
uint8 pixels decoded on the loop): they ride as one job, so they run in one executor batch, and
a `render` function other than the default JSON may shape the answer (service/routes/v2.py
renders tensors).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service import architecture, imaging
from service.batching import Batcher, Job
from service.errors import ApiError, retry_after
from service.operating_points import Choice

log = logging.getLogger("instanas.service")

INLINE_MAX_PIXELS = 1 << 20  # decoded pixels, all images together, of a request run on the loop's thread
LOOP_DECODE_MAX_PIXELS = 1 << 16  # pixels in the headers, all images together, of a request decoded on the loop

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)

    def serialized(obj):
        """`obj` as JSON already written, for a value that `dumps` writes into many responses."""
        return orjson.Fragment(orjson.dumps(obj))
except ImportError:  # pragma: no cover - orjson is in the serve extra
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def serialized(obj):
        return obj


@dataclass(frozen=True)
class Request:
    """What a worker needs to answer one request."""

    body: bytes | np.ndarray | None  # the image, when there is one (else `images`): encoded, decoded or prepared
    choice: Choice
    top_k: int
    t_start: float  # perf_counter when the handler started
    # Several images, each encoded bytes, (H, W, 3) uint8 pixels decoded on the loop, or a prepared
    # (3, H, W) float32 input: one result each, one batch.
    images: tuple = ()
    # (state, result, rows, request, stages, batch_s, batch_size, codes) -> the job's outcome; None: `render_json`
    render: Callable | None = None
    # Filled by the worker for the access log (service/logs.py): architectures, operating point, model version.
    notes: dict | None = None
    decode_s: float = 0.0  # seconds its images took to decode on the loop (`decoded_on_loop`)

    @property
    def items(self) -> tuple:
        return self.images if self.images else (self.body,)


def admit(state) -> None:
    """Refuse at once, before reading the body, when admitting could take the queue past
    `INSTANAS_MAX_QUEUE`. Requests admitted and still sending their body (`arriving`) count as
    queued already, since each will queue a job, and only a free worker takes one off: a request
    is admitted while queued + arriving - free workers < max_queue, which keeps the queue within
    the limit in whatever order the bodies arrive (a held batch never passes it either,
    service/batching.py). Call `state.batcher.expect()` right after, with no await between."""
    batcher = state.batcher
    if batcher.queued + batcher.arriving - batcher.free >= state.settings.max_queue:
        raise ApiError(503, "overloaded", "the server is at capacity; retry later", retry_after())


class admitted:
    """`async with admitted(state):` admission for a request whose body is still to be read: refused
    at once when the server is full (`admit`), else announced to the batcher (a batch that is not
    full may wait for it) until the block ends; a block that raises (a body refused or unreadable)
    withdraws the announcement. (A class: a generator-based context manager costs four times as much.)"""

    __slots__ = ("state",)

    def __init__(self, state):
        self.state = state

    async def __aenter__(self) -> None:
        admit(self.state)
        self.state.batcher.expect()

    async def __aexit__(self, kind, exc, traceback) -> bool:
        if kind is not None:
            self.state.batcher.cancel()
        return False


def image_error(exc: imaging.ImageError, index: int | None = None) -> ApiError:
    """The refusal of an image; `index` (counted from 0) names it in a multi-image request."""
    return ApiError(exc.status, exc.code, str(exc) if index is None else f"image {index}: {exc}")


def pixels(state, body: bytes) -> np.ndarray:
    """Image bytes -> (S, S, 3) uint8 RGB pixels at the bundle's input size S. A plain JPEG of that
    size is read by libjpeg-turbo directly (imaging.jpeg_pixels, the same pixels), any other image by Pillow."""
    pre = state.manifest.preprocessing
    decoded = imaging.jpeg_pixels(body, pre.input_size) if pre.input_size ** 2 <= state.settings.max_pixels else None
    if decoded is None:
        image = imaging.decode(body, max_pixels=state.settings.max_pixels, target_size=pre.input_size)
        decoded = imaging.to_pixels(image, pre.input_size)
    return decoded


def prepare(state, body: bytes) -> np.ndarray:
    """Image bytes -> the bundle's (3, H, W) float32 input."""
    return imaging.to_input(pixels(state, body), state.manifest.preprocessing)


def batch_of(state, items: list[np.ndarray]) -> np.ndarray:
    """The executor's (N, 3, H, W) float32 batch of a batch's images: pixels decoded, (H, W, 3)
    uint8, scaled and normalised all in one pass (the same values as `prepare`'s, image by image:
    the same arithmetic on each value), and inputs already prepared as they are."""
    pre = state.manifest.preprocessing
    if all(x.dtype == np.uint8 for x in items):
        return imaging.to_input(items[0][None] if len(items) == 1 else np.stack(items), pre)
    items = [imaging.to_input(x, pre) if x.dtype == np.uint8 else x for x in items]
    return items[0][None] if len(items) == 1 else np.stack(items)


def make_batcher(state) -> Batcher:
    settings, metrics = state.settings, state.metrics

    def on_done(n: int) -> None:
        metrics.executing(-n)

    def inline(job) -> bool:
        """Run on the loop's thread: the only request the server is handling, and a small one, in
        bytes and in decoded pixels (a small PNG of one colour may hold a very large picture)."""
        if metrics.requests_in_progress() > 1:
            return False
        if job.payload.decode_s:  # its images were small enough to decode on the loop (decoded_on_loop)
            return True
        items = job.payload.items
        if sum(len(x) if isinstance(x, bytes) else x.nbytes for x in items) > settings.inline_max_bytes:
            return False
        return sum(imaging.header_pixels(x) or 0 for x in items if isinstance(x, bytes)) <= INLINE_MAX_PIXELS

    def run(jobs: list[Job]) -> list:
        if state.before_batch is not None:
            state.before_batch(jobs)
        return process(state, jobs)

    return Batcher(run, workers=settings.max_concurrency,
                   max_batch_size=settings.max_batch_size, max_batch_delay_s=settings.max_batch_delay_ms / 1e3,
                   on_dispatch=metrics.executing, on_done=on_done, on_queue=metrics.queue_moved, max_queue=settings.max_queue,
                   inline=inline if settings.inline_max_bytes > 0 else None)


async def classify(state, body: bytes | None, choice: Choice, top_k: int, t_start: float, *, expected: bool = False,
                   images: Sequence = (), notes: dict | None = None) -> bytes:
    """Classify one image (batched with concurrent ones); its response as JSON bytes. With
    `images` (more than one), all of them as one batch: `{"results": [one response each, in order]}`.
    `expected`: the caller announced the request with `state.batcher.expect()` after admission.
    `notes`: a dict the worker fills for the access log."""
    if len(images) == 1:
        body, images = images[0], ()
    return await submit(state, Request(body, choice, top_k, t_start, images=tuple(images), notes=notes),
                        expected=expected)


async def submit(state, request: Request, *, expected: bool = False):
    """Run a request's images as one job of the batcher (so in one executor batch); its outcome,
    what its render function returned. Small JPEGs are decoded first, here (`decoded_on_loop`)."""
    try:
        request = decoded_on_loop(state, request)
    except BaseException:  # refused, or failed: the announced request never queues its job
        if expected:
            state.batcher.cancel()
        raise
    job = await state.batcher.run(request, expected=expected, size=len(request.items))
    return job.result


def decoded_on_loop(state, request: Request) -> Request:
    """`request` with its images decoded to pixels now, on the calling (event loop's) thread, when
    they are small plain JPEGs (imaging.plain_jpeg): at most `INSTANAS_INLINE_MAX_BYTES` encoded and
    LOOP_DECODE_MAX_PIXELS in their headers, all together (see the module docstring); else
    `request` as it is, for the worker to decode. An image that does not decode is refused here
    as the worker would (ApiError)."""
    t0 = time.perf_counter()  # the header's reading is decoding's first step
    items = request.items
    if not all(isinstance(x, bytes) for x in items) or sum(map(len, items)) > state.settings.inline_max_bytes:
        return request
    area = 0
    for item in items:
        size = imaging.plain_jpeg(item)
        if size is None:
            return request
        area += size[0] * size[1]
    if area > LOOP_DECODE_MAX_PIXELS:
        return request
    decoded = prepare_items(state, request)
    body, images = (None, tuple(decoded)) if request.images else (decoded[0], ())
    return Request(body, request.choice, request.top_k, request.t_start, images=images, render=request.render,
                   notes=request.notes, decode_s=time.perf_counter() - t0)


def prepare_items(state, request: Request) -> list[np.ndarray]:
    """Every image of a request decoded: encoded bytes to (H, W, 3) uint8 pixels, arrays (pixels
    decoded already, prepared inputs) as they are (`batch_of` makes the batch); an undecodable
    image refuses the whole request, naming its index when there are several."""
    items = request.items
    inputs = []
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray):
            inputs.append(item)
            continue
        try:
            inputs.append(pixels(state, item))
        except imaging.ImageError as exc:
            raise image_error(exc, index if len(items) > 1 else None) from None
    return inputs


def render_json(state, result, rows: Sequence[int], request: Request, stages: dict[str, float], batch_s: float,
                batch_size: int, codes: Sequence[str]) -> bytes:
    """/classify's body: one image's response, or `{"results": [...]}` for several."""
    if len(rows) == 1 and not request.images:
        return dumps(respond(state, result, rows[0], request, stages, batch_s, batch_size, codes[rows[0]], True))
    return dumps({"results": [respond(state, result, row, request, stages, batch_s, batch_size, codes[row], True)
                              for row in rows]})


def process(state, jobs: list[Job]) -> list:
    """A worker's batch: decode, run, render. One outcome per job: what its render function returns
    (JSON bytes by default) or an ApiError. All images of all jobs run as one executor batch."""
    t0 = time.perf_counter()
    outcomes: list = [None] * len(jobs)
    inputs, spans = [], []  # spans: (job index, the job's rows of the batch)
    for i, job in enumerate(jobs):
        try:
            prepared = prepare_items(state, job.payload)
        except ApiError as exc:
            outcomes[i] = exc
            continue
        spans.append((i, range(len(inputs), len(inputs) + len(prepared))))
        inputs.extend(prepared)
    if not spans:
        return outcomes
    batch = batch_of(state, inputs)
    t1 = time.perf_counter()
    points, given = [], []
    for i, rows in spans:
        choice = jobs[i].payload.choice
        points += [choice.operating_point] * len(rows)
        given += [choice.executed] * len(rows)
    result = state.executor.run_batch(batch, points, given)
    metrics = state.metrics
    metrics.later(metrics.batch_size.observe, len(inputs))
    decode_s = t1 - t0
    codes = result.codes or architecture.encode_many(result.executed)
    for i, rows in spans:
        job = jobs[i]
        request = job.payload
        stages = {"decode": decode_s + request.decode_s, "queue": job.queue_s, **result.seconds}
        metrics.later(metrics.batch_wait.observe, job.batch_s)
        state.governor.observe(job.queue_s)
        try:
            outcomes[i] = (request.render or render_json)(state, result, rows, request, stages, job.batch_s,
                                                          len(inputs), codes)
        except ApiError as exc:
            outcomes[i] = exc
        except Exception as exc:  # noqa: BLE001 - one request's renderer failing fails that request only
            log.exception("rendering a response failed")
            outcomes[i] = exc
        if request.notes is not None:
            request.notes.update(architecture=[codes[row] for row in rows], operating_point=result.point(rows[0]),
                                 model=state.name, model_version=state.manifest.version)
    return outcomes


def respond(state, result, row: int, request: Request, stages: dict[str, float], batch_s: float,
            batch_size: int, code: str | None = None, written: bool = False) -> dict:
    """One image's response body (service.schemas.ClassifyResponse as plain JSON data) from row
    `row` of an executor result; observes its metrics. `written`: the parts shared by many
    responses (model, architecture) come as JSON already written, for `dumps` only (`serialized`)."""
    choice = request.choice
    executed = result.executed[row]
    code = code or architecture.encode(executed)
    latency_ms, mflops = observe(state, result, row, choice, stages, code)
    trace = result.trace(row)
    classes = state.manifest.classes
    probs = result.probabilities[row].tolist()
    scores = [{"index": i, "label": classes[i], "probability": probs[i]} for i in ranked(probs, request.top_k)]
    latency = {stage: round(v * 1e3, 4) for stage, v in stages.items()}
    latency["total"] = round((time.perf_counter() - request.t_start) * 1e3, 4)
    latency["batch"] = round(batch_s * 1e3, 4)
    latency["batch_size"] = batch_size
    block, block_json = described(state, result, row, executed, code, latency_ms, mflops)
    return {
        "model": state.model_written if written else state.model_json,
        "prediction": scores[0],
        "top_k": scores,
        "architecture": block_json if written else block,
        "operating_point": {"name": choice.operating_point, "reason": choice.reason},
        "cascade": None if trace is None else {
            "stages": [{"network": stage.network, "resolution": stage.resolution, "code": stage.code,
                        "confidence": sure, "threshold": stage.threshold, "answered": i == trace.answered}
                       for i, (stage, sure) in enumerate(zip(trace.ran, trace.confidences))],
            "escalated": trace.escalated},
        "latency_ms": latency,
    }


def ranked(probabilities: list[float], k: int) -> list[int]:
    """The indices of the `k` highest probabilities, highest first, equals in index order (as a
    stable argsort of their negation)."""
    if k == 1:
        return [max(range(len(probabilities)), key=probabilities.__getitem__)]  # the first of equals
    return sorted(range(len(probabilities)), key=probabilities.__getitem__, reverse=True)[:k]


CELLS_CACHED = 1024  # architectures whose `cells` list, `architecture` block and costs a model keeps


def described(state, result, row: int, executed: np.ndarray, code: str, latency_ms: float,
              mflops: float) -> tuple[dict, object]:
    """A response's `architecture` block, and the same as JSON already written (`serialized`). The
    same for every image that ran the same network and architecture at the same estimated cost, so
    built once and shared by the responses after: read only."""
    trace = result.trace(row)
    network = None if trace is None else trace.stage.network
    key = (code, network, latency_ms, mflops)
    described_ = state.architectures_by_code.get(key)
    if described_ is None:
        block = {
            "code": code,
            "resolution": resolution(state, result, row),
            "network": network,
            "cells": cells(state, executed, code),
            "modules_executed": int(executed.sum()),
            "mflops": round(mflops, 4),
            "estimated_latency_ms": round(latency_ms, 4),
            "relative_to_baseline": round(latency_ms / state.costs.baseline_ms, 4),
        }
        if len(state.architectures_by_code) >= CELLS_CACHED:
            state.architectures_by_code.clear()
        described_ = state.architectures_by_code[key] = (block, serialized(block))
    return described_


def cells(state, executed: np.ndarray, code: str) -> list[dict]:
    """A response's `architecture.cells`: each cell and the names of the modules that ran in it.
    Built once per architecture (`code` is `executed`'s) and shared by every response after: read only."""
    listed = state.cells_by_code.get(code)
    if listed is None:
        names = state.module_names
        listed = [{"cell": c, "modules": [names[c][m] for m in np.flatnonzero(executed[c])]} for c in range(len(names))]
        if len(state.cells_by_code) >= CELLS_CACHED:
            state.cells_by_code.clear()
        state.cells_by_code[code] = listed
    return listed


def observe(state, result, row: int, choice: Choice, stages: dict[str, float],
            code: str | None = None) -> tuple[float, float]:
    """Observe one image's metrics (architecture, operating point, stages; after the response
    where it runs on the event loop, `ModelMetrics.later`); its estimated latency (ms) and MFLOPs
    (`code`: its architecture's, when known: the costs are then looked up once per code)."""
    costs = state.costs
    executed = result.executed[row]
    point = result.point(row)
    trace = result.trace(row)
    if trace is None:
        held = None if code is None else state.costs_by_code.get((code, point))
        if held is None:
            held = float(costs.latency_ms(executed[None], point)[0]), float(costs.mflops(executed[None], point)[0])
            if code is not None:
                if len(state.costs_by_code) >= CELLS_CACHED:
                    state.costs_by_code.clear()
                state.costs_by_code[(code, point)] = held
        latency_ms, mflops = held
    else:
        latency_ms, mflops = trace.estimated_ms, trace.mflops
    state.metrics.later(_observed, state.metrics, executed, latency_ms, mflops, resolution(state, result, row),
                        choice, stages, point if trace is not None and trace.escalated else None)
    return latency_ms, mflops


def _observed(metrics, executed: np.ndarray, latency_ms: float, mflops: float, resolution: int, choice: Choice,
              stages: dict[str, float], escalated_at: str | None) -> None:
    """The metric updates of one image (`observe`)."""
    if escalated_at is not None:
        metrics.escalations.labels(escalated_at).inc()
    metrics.observe_architecture(executed, latency_ms, mflops)
    metrics.resolutions.labels(str(resolution)).inc()
    metrics.operating_points.labels(choice.operating_point or "", choice.reason).inc()
    for stage, seconds in stages.items():
        metrics.stage_duration.labels(stage).observe(seconds)


def resolution(state, result, row: int) -> int:
    """The input resolution of the network that answered row `row`."""
    trace = result.trace(row)
    return state.manifest.preprocessing.input_size if trace is None else trace.stage.resolution
