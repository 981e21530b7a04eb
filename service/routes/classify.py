"""`POST /classify`: one image in the body (raw, multipart or JSON base64), or several (multipart `file` parts,
JSON `images`) classified as one batch; their classes and the architectures that ran."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import Headers

from service import classification, imaging, inputs, logs, operating_points
from service.errors import ERROR_RESPONSES, ApiError
from service.schemas import ClassifyResponse
from service.repository import Models

MULTIPART = "multipart/form-data"
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"
ACCEPTED_MEDIA_TYPES = sorted(imaging.SUPPORTED_MEDIA_TYPES | {MULTIPART, OCTET_STREAM, JSON})

router = APIRouter()


async def receive_body(receive) -> bytes:
    """The whole body, from an ASGI `receive`; 400 `client_disconnected` when the client goes first.
    Its size and the time it takes are bounded below the routes, for every route alike
    (service/limits.py: 413 `body_too_large`, 408 `request_timeout`)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client_disconnected", "the client closed the connection before the body ended")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


_BODY = {"requestBody": {"required": True, "content": {
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(imaging.SUPPORTED_MEDIA_TYPES)},
    OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}},
    MULTIPART: {"schema": {"type": "object", "required": ["file"], "properties": {"file": {
        "description": "One image, or several (one `file` part each): then the response is {results: [...]}.",
        "oneOf": [{"type": "string", "format": "binary"}, {"type": "array", "items": {"type": "string", "format": "binary"}}]}}}},
    JSON: {"schema": {"type": "object", "description": "One image (`image`) or several (`images`), base64; several "
                      "give {results: [...]}.", "properties": {
        "image": {"type": "string", "format": "byte"},
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}}}}}


@router.post("/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES, openapi_extra=_BODY,
             summary="Classify one image with the architecture the controller picks for it")
async def classify(
    request: Request,
    models: Models,
    model: str | None = Query(None, description="The model to use, by name (GET /models); default: the default model."),
    top_k: int | None = Query(None, ge=1, description="How many classes to list (at most the model's classes)."),
    operating_point: str | None = Query(None, description="The controller to use (see GET /model); default: the bundle's."),
    max_latency_ms: float | None = Query(None, gt=0, allow_inf_nan=False, description="Use the most accurate operating point whose measured "
                                         "mean latency per image fits this budget (queue time not included)."),
    architecture: str = Query(operating_points.AUTO, description="auto (the controller decides), mobilenet_v2 "
                              "(module 0 in every cell), all, or an architecture code as /classify returns it."),
) -> Response:
    return Response(await answer(models, request.scope, request.receive, request.headers.get("content-type", ""),
                                 model, top_k, operating_point, max_latency_ms, architecture),
                    media_type="application/json")


async def answer(models, scope, receive, content_type: str, model: str | None, top_k: int | None,
                 operating_point: str | None, max_latency_ms: float | None, architecture: str) -> bytes:
    """POST /classify past its parameters (parsed and validated by the route, or by the fast path,
    service/fast_path.py): admission, the body, the images, the response body as JSON bytes
    (service.classification.respond, the ClassifyResponse schema; {"results": [...]} of them for
    several images). Refusals raise ApiError."""
    t_start = time.perf_counter()
    state = models.get(model)
    media_type = content_type.split(";")[0].strip().lower()
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {media_type or '(none)'} is not accepted; send one of {', '.join(ACCEPTED_MEDIA_TYPES)}")
    classes = state.manifest.classes
    k = top_k or min(state.settings.default_top_k, len(classes))
    if k > len(classes):
        raise ApiError(422, "invalid_request", f"top_k is {k}, but the model has {len(classes)} classes")
    choice = operating_points.choose(state.manifest, operating_point=operating_point, max_latency_ms=max_latency_ms,
                                     architecture_code=architecture, governor=state.governor)
    # Admission first: a full server refuses before reading or decoding anything.
    async with classification.admitted(state):
        body = await receive_body(receive)
        limit = state.settings.max_images_per_request
        if media_type == MULTIPART:
            images = await inputs.files_from_multipart(Headers(scope=scope), body, limit)
        elif media_type == JSON:
            images = inputs.images_from_json(body, limit)
        else:
            images = [body]
    return await classification.classify(state, None, choice, k, t_start, expected=True, images=images,
                                         notes=logs.notes(scope))
