"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     probes
    GET  /v2/models/{name}[/versions/{v}]      model metadata (its inputs and outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

The model is the served bundle: its manifest's name and version. An inference request has
one input, either

- `image`: BYTES, shape [N] or [N, 1], one encoded image an element (raw bytes in binary
  data; base64 strings in JSON), or
- `input`: FP32, shape [N, 3, H, W], images already preprocessed as the manifest says,

and gets the outputs below, all of them or those it names. The N images run as one batch
through the same request path as /classify (service/classification.py). Request parameters
`operating_point`, `max_latency_ms` and `architecture` do what /classify's query parameters do.

Binary data: a body whose `Inference-Header-Content-Length` header says how long its JSON part
is carries the inputs whose `parameters.binary_data_size` is set, in order, after the JSON.
Outputs come back binary when `binary_data_output` (request parameter) or an output's own
`binary_data` parameter says so; the response then has the same header. tritonclient[http]
does both by default.

Errors are the protocol's `{"error": "<message>"}`: 404 for an unknown model or version, 400
for a request that does not fit, 413 over the limits, 503 when the server is at capacity.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import classification, inputs, logs, operating_points
from service.errors import ApiError
from service.routes.classify import receive_body
from service.repository import Models

log = logging.getLogger("instanas.service")

IMAGE, TENSOR = "image", "input"  # the two inputs
HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"
# The outputs, in order: name -> datatype
OUTPUTS = {"probabilities": "FP32", "label": "BYTES", "index": "INT64", "architecture": "BYTES",
           "operating_point": "BYTES", "estimated_latency_ms": "FP32", "resolution": "INT64", "escalated": "BOOL"}
_NUMPY = {"FP32": "<f4", "INT64": "<i8", "BOOL": "|b1"}
# /classify's statuses that mean "this request does not fit" are 400 in this protocol.
_STATUS = {415: 400, 422: 400}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """Every refusal of a /v2 route in the protocol's shape, `{"error": "..."}`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except ApiError as exc:
                _count(request, exc.code)
                return error(_STATUS.get(exc.status, exc.status), exc.message, exc.headers)
            except RequestValidationError as exc:
                _count(request, "invalid_request")
                return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
            except StarletteHTTPException as exc:
                return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
            except Exception:
                log.exception("unhandled error")
                return error(500, "the server failed to handle this request; see its log")

        return guarded


def _count(request: Request, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejections.labels(code).inc()


router = APIRouter(prefix="/v2", route_class=V2Route, tags=["Open Inference Protocol (v2)"])


# --- metadata and health ----------------------------------------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata(request: Request):
    return {"name": "instanas", "version": request.app.version, "extensions": [BINARY_EXTENSION, "model_repository"]}


@router.get("/health/live", summary="The process is up")
async def live():
    return {"live": True}


def _ready(models, state=None) -> bool:
    """Every model (or `state`) loaded, verified and warmed up, and not draining after SIGTERM
    (as GET /healthz/ready)."""
    return models.serving if state is None else state.ready and not models.draining


@router.get("/health/ready", summary="The model is loaded and verified; requests are served (503 while starting "
            "or draining)")
async def ready(models: Models):
    ok = _ready(models)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def _model(models, name: str, version: str | None):
    """The served model `name` (at `version`, when given); 404 otherwise."""
    state = models.get(name)
    manifest = state.manifest
    if version is not None and version != manifest.version:
        raise ApiError(404, "unknown_model_version", f"model {name!r} has no version {version!r}; "
                       f"it serves version {manifest.version!r}")
    return state


def _metadata(state) -> dict:
    manifest = state.manifest
    size = manifest.preprocessing.input_size
    n = len(manifest.classes)
    shapes = {"probabilities": [-1, n]}
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": "instanas_onnxruntime",
        "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                   {"name": TENSOR, "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": name, "datatype": datatype, "shape": shapes.get(name, [-1])}
                    for name, datatype in OUTPUTS.items()],
    }


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(name: str, models: Models):
    return _metadata(_model(models, name, None))


@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)")
async def model_version_metadata(name: str, version: str, models: Models):
    return _metadata(_model(models, name, version))


def _model_ready(models, name: str, version: str | None) -> JSONResponse:
    ok = _ready(models, _model(models, name, version))
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}/ready", summary="The model is ready")
async def model_ready(name: str, models: Models):
    return _model_ready(models, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="The model is ready (one version)")
async def model_version_ready(name: str, version: str, models: Models):
    return _model_ready(models, name, version)


@router.post("/repository/index", summary="The served models (Triton's model repository extension)")
async def repository_index(models: Models):
    return [{"name": state.name, "version": state.manifest.version,
             "state": "READY" if _ready(models, state) else "UNAVAILABLE"} for state in models.states.values()]


# --- inference ----------------------------------------------------------------------------------------------


@router.post("/models/{name}/infer", summary="Classify a batch of images (encoded, or preprocessed tensors)")
async def infer(name: str, request: Request, models: Models):
    return await _infer(request, _model(models, name, None), name)


@router.post("/models/{name}/versions/{version}/infer", summary="Classify a batch of images (one version)")
async def infer_version(name: str, version: str, request: Request, models: Models):
    return await _infer(request, _model(models, name, version), name)


@dataclass(frozen=True)
class Wanted:
    """What a request asked back: outputs in order, each binary or not; its id; the model it named."""

    outputs: tuple[tuple[str, bool], ...]
    id: str | None
    model_name: str
    model_version: str


async def _infer(request: Request, state, name: str) -> Response:
    t_start = time.perf_counter()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(400, "unsupported_encoding", f"compressed requests ({encoding}) are not supported")
    async with classification.admitted(state):
        body = await receive_body(request.receive)
        images, choice, wanted = parse(state, request.headers.get(HEADER_LENGTH), body, name)
    payload = classification.Request(None, choice, 1, t_start, images=tuple(images), render=partial(render, wanted),
                                     notes=logs.notes(request.scope))
    content, header_length = await classification.submit(state, payload, expected=True)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_inference_request", message)


def parse(state, header_length: str | None, body: bytes, name: str) -> tuple[list, operating_points.Choice, Wanted]:
    """An inference request's body -> (images: encoded bytes or (3, H, W) float32 arrays, the choice
    its parameters make, what it wants back)."""
    binary = b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length is {header_length!r}, but the body has {len(body)} bytes")
        body, binary = body[: int(header_length)], body[int(header_length):]
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep (a hostile body)
        raise _bad(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad("the inference request must be a JSON object")
    parameters = _object(doc.get("parameters"), "parameters")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("id must be a string")
    tensors = doc.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise _bad(f"the request has no inputs; give one: {IMAGE!r} (BYTES) or {TENSOR!r} (FP32)")
    if len(tensors) != 1:
        raise _bad(f"the request has {len(tensors)} inputs; give one: {IMAGE!r} (BYTES) or {TENSOR!r} (FP32)")
    images = _input(state, _object(tensors[0], "inputs[0]"), binary)
    choice = _choice(state, parameters)
    wanted = Wanted(_outputs(doc.get("outputs"), parameters), request_id, name, state.manifest.version)
    return images, choice, wanted


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _input(state, tensor: dict, binary: bytes) -> list:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in (IMAGE, TENSOR):
        raise _bad(f"unknown input {name!r}; this model takes {IMAGE!r} (BYTES) or {TENSOR!r} (FP32)")
    expected = "BYTES" if name == IMAGE else "FP32"
    if datatype != expected:
        raise _bad(f"input {name!r} must be {expected}, not {datatype}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"input {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
    size = state.manifest.preprocessing.input_size
    if name == IMAGE and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise _bad(f"input {IMAGE!r} has shape {shape}; it must be [N] or [N, 1], one encoded image an element")
    if name == TENSOR and shape[1:] != [3, size, size]:
        raise _bad(f"input {TENSOR!r} has shape {shape}; it must be [N, 3, {size}, {size}]")
    count = shape[0]
    if count == 0:
        raise _bad(f"input {name!r} holds no images")
    limit = state.settings.max_images_per_request
    if count > limit:
        raise inputs.too_many(count, limit)
    params = _object(tensor.get("parameters"), f"input {name!r} parameters")
    size_param = params.get("binary_data_size")
    if size_param is not None:
        if not isinstance(size_param, int) or isinstance(size_param, bool) or size_param < 0:
            raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise _bad(f"input {name!r} has both data and binary_data_size")
        if size_param != len(binary):
            raise _bad(f"input {name!r} says binary_data_size {size_param}, but {len(binary)} bytes follow the JSON")
        raw = binary
    else:
        if binary:
            raise _bad(f"{len(binary)} bytes follow the JSON, but no input has binary_data_size")
        if "data" not in tensor:
            raise _bad(f"input {name!r} has neither data nor binary_data_size")
        raw = None
    if name == IMAGE:
        elements = _split_bytes(raw, name) if raw is not None else _json_images(tensor["data"])
        if len(elements) != count:
            raise _bad(f"input {IMAGE!r} has shape {shape} but holds {len(elements)} elements")
        return elements
    per_image = 3 * size * size
    if raw is not None:
        if len(raw) != count * per_image * 4:
            raise _bad(f"input {TENSOR!r} has shape {shape} ({count * per_image * 4} bytes of FP32), "
                       f"but its binary data is {len(raw)} bytes")
        array = np.frombuffer(raw, "<f4")
    else:
        try:
            array = np.asarray(_flatten(tensor["data"]), dtype=np.float32)
        except (TypeError, ValueError):
            raise _bad(f"input {TENSOR!r}: data must be numbers") from None
        if array.size != count * per_image:
            raise _bad(f"input {TENSOR!r} has shape {shape} but holds {array.size} values")
    array = array.astype(np.float32, copy=False).reshape(count, 3, size, size)
    return list(array)


def _flatten(data) -> list:
    """Row-major elements of JSON tensor data, flat or nested."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    out: list = []
    for x in data:
        out.extend(_flatten(x))
    return out


def _json_images(data) -> list[bytes]:
    """BYTES elements in JSON: base64 strings (or {"b64": "..."})."""
    elements = _flatten(data)
    out = []
    for i, element in enumerate(elements):
        if isinstance(element, dict) and isinstance(element.get("b64"), str):
            element = element["b64"]
        if not isinstance(element, str):
            raise _bad(f"input {IMAGE!r}: element {i} must be a base64 string")
        out.append(inputs.decode_base64(element, i))
    return out


def _split_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES in binary data: each element a 4-byte little-endian length, then its bytes."""
    out, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad(f"input {name!r}: binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad(f"input {name!r}: binary BYTES element {len(out)} says {n} bytes, but {len(raw) - pos} remain")
        out.append(bytes(view[pos:pos + n]))
        pos += n
    return out


def _choice(state, parameters: dict) -> operating_points.Choice:
    operating_point, max_latency_ms = parameters.get("operating_point"), parameters.get("max_latency_ms")
    architecture = parameters.get("architecture")
    for key, value in (("operating_point", operating_point), ("architecture", architecture)):
        if value is not None and not isinstance(value, str):
            raise _bad(f"parameter {key} must be a string")
    if max_latency_ms is not None and (isinstance(max_latency_ms, bool) or not isinstance(max_latency_ms, int | float)
                                       or not 0 < max_latency_ms < math.inf):
        raise _bad("parameter max_latency_ms must be a finite number above 0")
    return operating_points.choose(state.manifest, operating_point=operating_point or None,
                                   max_latency_ms=max_latency_ms, architecture_code=architecture,
                                   governor=state.governor)


def _outputs(requested, parameters: dict) -> tuple[tuple[str, bool], ...]:
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise _bad("parameter binary_data_output must be true or false")
    if requested is None:
        return tuple((name, default) for name in OUTPUTS)
    if not isinstance(requested, list) or not requested:
        raise _bad("outputs must be a non-empty list")
    out = []
    for i, output in enumerate(requested):
        output = _object(output, f"outputs[{i}]")
        name = output.get("name")
        if name not in OUTPUTS:
            raise _bad(f"unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
        params = _object(output.get("parameters"), f"output {name!r} parameters")
        if "classification" in params:
            raise _bad("the classification extension is not supported; ask for the label and probabilities outputs")
        binary = params.get("binary_data", default)
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}: binary_data must be true or false")
        out.append((name, binary))
    return tuple(out)


def render(wanted: Wanted, state, result, rows: Sequence[int], request, stages: dict[str, float], batch_s: float,
           batch_size: int, codes: Sequence[str]) -> tuple[bytes, int | None]:
    """In the worker: the response body and, when it carries binary data, its JSON part's length."""
    rows = list(rows)
    n = len(rows)
    probabilities = result.probabilities[rows[0]:rows[-1] + 1].astype(np.float32)
    index = probabilities.argmax(axis=1).astype(np.int64)
    estimated = np.array([classification.observe(state, result, row, request.choice, stages)[0] for row in rows],
                         np.float32)
    classes = state.manifest.classes
    values = {
        "probabilities": probabilities,
        "label": [classes[i] for i in index],
        "index": index,
        "architecture": [codes[row] for row in rows],
        "operating_point": [result.point(row) or "" for row in rows],
        "estimated_latency_ms": estimated,
        "resolution": np.array([classification.resolution(state, result, row) for row in rows], np.int64),
        "escalated": np.array([result.trace(row) is not None and result.trace(row).escalated for row in rows], bool),
    }
    outputs, chunks = [], []
    for name, binary in wanted.outputs:
        datatype, value = OUTPUTS[name], values[name]
        tensor = {"name": name, "datatype": datatype, "shape": list(value.shape) if name == "probabilities" else [n]}
        if binary:
            if datatype == "BYTES":
                data = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in value)
            else:
                data = np.ascontiguousarray(value, _NUMPY[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = value if datatype == "BYTES" else value.reshape(-1).tolist()
        outputs.append(tensor)
    doc = {"model_name": wanted.model_name, "model_version": wanted.model_version}
    if wanted.id is not None:
        doc["id"] = wanted.id
    doc["parameters"] = {"operating_point_reason": request.choice.reason}
    doc["outputs"] = outputs
    header = classification.dumps(doc)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


# --- anything else under /v2 ------------------------------------------------------------------------------------


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
async def not_found(request: Request):
    path = request.scope["path"]
    if any(route.path_regex.match(path) for route in router.routes if getattr(route, "endpoint", None) is not not_found):
        return error(405, f"method {request.method} is not allowed on {request.url.path}")
    return error(404, f"no such endpoint: {request.url.path}")
