"""Encoded images out of a request body: multipart `file` parts and JSON base64 strings.

Raw bodies are one image as they are. A multipart body may carry several `file` parts, a JSON
body `{"images": ["<base64>", ...]}` or `{"image": "<base64>"}`; each image in order, at most
`limit` of them. Refusals are ApiErrors with their own codes (docs/API.md, "Errors").
"""

from __future__ import annotations

import base64
import binascii
import json

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.errors import ApiError

JSON_SHAPE = 'a JSON object {"images": ["<base64>", ...]} or {"image": "<base64>"}'


def too_many(count: int | str, limit: int) -> ApiError:
    return ApiError(413, "too_many_images", f"the request carries {count} images; the limit is {limit} a request")


def _where(index: int | None) -> str:
    return "the image" if index is None else f"image {index}"


def decode_base64(text: str, index: int | None = None) -> bytes:
    """Standard base64 (line breaks and missing padding tolerated; a `data:...;base64,` URL too);
    400 `invalid_base64` naming the image otherwise."""
    s = text.strip()
    if s.startswith("data:"):
        head, sep, rest = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, "invalid_base64", f"{_where(index)} is a data URL that is not base64")
        s = rest
    s = "".join(s.split())
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"{_where(index)} is not valid base64: {exc}") from None


def images_from_json(body: bytes, limit: int) -> list[bytes]:
    """The images of a JSON body, decoded from base64, in order."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included; RecursionError: nested too deep
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_request", f"the body must be {JSON_SHAPE}, not a JSON {type(doc).__name__}")
    if "image" in doc and "images" in doc:
        raise ApiError(422, "invalid_request", 'give "image" or "images", not both')
    if "image" in doc:
        if not isinstance(doc["image"], str):
            raise ApiError(422, "invalid_request", f'"image" must be a base64 string, not {_kind(doc["image"])}')
        return [decode_base64(doc["image"])]
    if "images" not in doc:
        raise ApiError(400, "missing_image", f"the JSON body has no images; send {JSON_SHAPE}")
    images = doc["images"]
    if not isinstance(images, list):
        raise ApiError(422, "invalid_request", f'"images" must be a list of base64 strings, not {_kind(images)}')
    if not images:
        raise ApiError(400, "missing_image", '"images" is empty')
    if len(images) > limit:
        raise too_many(len(images), limit)
    for i, value in enumerate(images):
        if not isinstance(value, str):
            raise ApiError(422, "invalid_request", f'"images"[{i}] must be a base64 string, not {_kind(value)}')
    return [decode_base64(value, i if len(images) > 1 else None) for i, value in enumerate(images)]


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


async def files_from_multipart(headers: Headers, body: bytes, limit: int) -> list[bytes]:
    """The `file` parts of a multipart body, in order."""
    async def stream():
        yield body

    parser = MultiPartParser(headers, stream(), max_files=limit, max_fields=16)
    # Parts stay in memory (never a temporary file, so a read-only filesystem is fine): the
    # body is in memory already and within INSTANAS_MAX_BODY_BYTES, so no part can be larger.
    parser.spool_max_size = len(body) + 1
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise too_many(f"more than {limit}", limit) from None
        raise ApiError(400, "invalid_multipart", f"the multipart body could not be parsed: {exc.message}") from None
    try:
        uploads = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
        if not uploads:
            raise ApiError(400, "missing_file", "the multipart body has no file field named 'file'")
        return [await upload.read() for upload in uploads]
    finally:
        await form.close()
