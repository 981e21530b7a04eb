"""The live demo: `GET /` (a static page, service/static/), the controllers' graphs for the
browser, and a gallery of images grouped by the architecture the controller chose for them.

- `GET /` and `GET /static/{path}`: plain HTML, CSS and JavaScript, no build step; the page runs
  the controller in the visitor's browser with the vendored onnxruntime-web
  (scripts/vendor-onnxruntime-web.sh) and compares its choice with the server's.
- `GET /model/controllers/{name}.onnx`: an operating point's controller graph, only those the
  manifest lists, checked against the manifest's sha256 before it is served; behind
  `INSTANAS_API_TOKEN` like `GET /model` (the page needs both).
- `GET /demo/samples`: the CIFAR-10 test images shipped under service/static/samples/.
- `GET /demo/gallery`: those samples (or up to `INSTANAS_DEMO_GALLERY_LIMIT` images of the
  folder `INSTANAS_DEMO_GALLERY`) classified once per operating point, grouped by architecture
  code, heaviest first, each group's images from the least sure to the surest (`confidence`: a
  cascade's first-stage confidence, else the answer's probability); `GET /demo/gallery/images/{index}` serves a gallery image.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from service import architecture, classification, imaging, operating_points
from service.errors import ApiError
from service.schemas import ErrorResponse
from service.security import require_token
from service.state import State

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SAMPLES_DIR = STATIC_DIR / "samples"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
GALLERY_BATCH = 16

# Not every system's mime.types knows these, and a browser compiles WebAssembly while it
# downloads only when it comes as application/wasm.
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("text/javascript", ".js")


@dataclass(frozen=True)
class GalleryImage:
    name: str
    label: str | None  # the true class where the file name or its folder says it
    url: str
    data: bytes


@dataclass
class DemoCache:
    """Per app: gallery images; galleries by (bundle, operating point) and controller graphs by
    sha256, so a bundle reloaded under the app (service/reload.py) is never answered from the old one."""

    gallery: Path | None  # INSTANAS_DEMO_GALLERY (service.settings)
    gallery_limit: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    images: list[GalleryImage] | None = None
    galleries: dict[tuple[str, str | None], dict] = field(default_factory=dict)
    controllers: dict[str, bytes] = field(default_factory=dict)


router = APIRouter()
_static = StaticFiles(directory=STATIC_DIR, check_dir=False)


def demo_cache(request: Request) -> DemoCache:
    cache = getattr(request.app.state, "instanas_demo", None)
    if cache is None:
        settings = request.app.state.settings
        cache = DemoCache(settings.demo_gallery, settings.demo_gallery_limit)
        request.app.state.instanas_demo = cache
    return cache


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/static/{path:path}", include_in_schema=False)
async def static(path: str, request: Request) -> Response:
    """The page's files (ETag and If-None-Match handled by Starlette; always revalidated)."""
    response = await _static.get_response(path, request.scope)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.get("/model/controllers/{name}.onnx", response_class=Response, dependencies=[Depends(require_token)],
            responses={200: {"content": {"application/octet-stream": {}}}, 401: {"model": ErrorResponse},
                       404: {"model": ErrorResponse}},
            summary="An operating point's controller graph (ONNX), for running the controller in a browser")
async def controller_graph(name: str, request: Request, state: State) -> Response:
    point = next((c for c in state.manifest.controllers if c.name == name), None)
    if point is None:
        names = ", ".join(c.name for c in state.manifest.controllers) or "none: the bundle is static"
        raise ApiError(404, "unknown_operating_point", f"no controller {name!r} in this bundle (operating points: {names})")
    etag = f'"{point.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    cache = demo_cache(request)
    data = cache.controllers.get(point.sha256)
    if data is None:
        data = await asyncio.to_thread(_read_verified, state.bundle.path, point.file, point.sha256)
        cache.controllers[point.sha256] = data
    return Response(data, media_type="application/octet-stream", headers=headers)


def _read_verified(root: Path, name: str, sha256: str) -> bytes:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise ApiError(500, "bundle_file_invalid", f"the manifest names {name!r}, outside the bundle")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ApiError(500, "bundle_file_changed", f"{name} no longer matches the manifest's sha256")
    return data


@router.get("/demo/samples", summary="The sample images shipped with the demo page")
async def samples() -> dict:
    return {"samples": [{"name": p.name, "url": f"/static/samples/{p.name}", "label": _label_of(p, SAMPLES_DIR)}
                        for p in _image_files(SAMPLES_DIR, limit=1000)]}


def _image_files(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit]


def _label_of(path: Path, root: Path) -> str | None:
    """`cat-0002.jpg` or `.../cat/0002.jpg` -> "cat" (checked against the bundle's classes later)."""
    if path.parent != root:
        return path.parent.name
    stem = path.stem
    return stem.rsplit("-", 1)[0] if "-" in stem else None


def _gallery_images(cache: DemoCache, max_bytes: int) -> list[GalleryImage]:
    if cache.gallery is None:
        return [GalleryImage(p.name, _label_of(p, SAMPLES_DIR), f"/static/samples/{p.name}", p.read_bytes())
                for p in _image_files(SAMPLES_DIR, limit=1000)]
    root = cache.gallery
    if not root.is_dir():
        raise ApiError(503, "gallery_unavailable", f"INSTANAS_DEMO_GALLERY={root} is not a folder")
    out = []
    for p in _image_files(root, limit=cache.gallery_limit):
        if p.stat().st_size <= max_bytes:
            out.append(GalleryImage(str(p.relative_to(root)), _label_of(p, root), f"/demo/gallery/images/{len(out)}",
                                    p.read_bytes()))
    return out


@router.get("/demo/gallery", summary="Sample images grouped by the architecture that answered them")
async def gallery(request: Request, state: State,
                  operating_point: str | None = Query(None, description="The operating point (default: the bundle's).")):
    choice = operating_points.choose(state.manifest, operating_point=operating_point)
    cache = demo_cache(request)
    async with cache.lock:  # one classification per operating point, however many visitors ask at once
        if cache.images is None:
            cache.images = await asyncio.to_thread(_gallery_images, cache, state.settings.max_body_bytes)
        key = (state.bundle.sha256, choice.operating_point)
        if key not in cache.galleries:
            cache.galleries[key] = await asyncio.to_thread(_classify_gallery, state, cache.images, choice)
    return cache.galleries[key]


@router.get("/demo/gallery/images/{index}", include_in_schema=False)
async def gallery_image(index: int, request: Request) -> Response:
    images = demo_cache(request).images or []
    if not 0 <= index < len(images):
        raise ApiError(404, "not_found", f"no gallery image {index}")
    image = images[index]
    media = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    return Response(image.data, media_type=media, headers={"Cache-Control": "no-cache",
                                                            "X-Content-Type-Options": "nosniff"})


def _classify_gallery(state, images: list[GalleryImage], choice: operating_points.Choice) -> dict:
    """Classify every gallery image as /classify would (same decoding, same executor) and group them."""
    manifest, costs = state.manifest, state.costs
    classes = manifest.classes
    rows, skipped = [], []
    for start in range(0, len(images), GALLERY_BATCH):
        chunk, inputs = [], []
        for image in images[start:start + GALLERY_BATCH]:
            try:
                inputs.append(classification.prepare(state, image.data))
                chunk.append(image)
            except imaging.ImageError as exc:
                skipped.append({"name": image.name, "error": exc.code})
        if not chunk:
            continue
        n = len(chunk)
        result = state.executor.run_batch(np.stack(inputs), [choice.operating_point] * n, [None] * n)
        for i, image in enumerate(chunk):
            rows.append((image, result.executed[i], result.probabilities[i], result.point(i), result.trace(i)))
    groups: dict[tuple, dict] = {}
    correct = labelled = 0
    for image, executed, probs, point, trace in rows:
        code = architecture.encode(executed)
        answer = None if trace is None else trace.stage
        key = (code, None if answer is None else answer.network)
        group = groups.get(key)
        if group is None:
            if trace is None:
                latency_ms = float(costs.latency_ms(executed[None], point)[0])
                mflops = float(costs.mflops(executed[None], point)[0])
            else:
                latency_ms, mflops = trace.estimated_ms, trace.mflops
            group = groups[key] = {
                "code": code,
                "resolution": manifest.preprocessing.input_size if answer is None else answer.resolution,
                "network": None if answer is None else answer.network,
                "stages": None if trace is None else len(trace.ran),
                "cells": [[int(m) for m in np.flatnonzero(cell)] for cell in executed],
                "modules_executed": int(executed.sum()),
                "mflops": round(mflops, 4),
                "estimated_latency_ms": round(latency_ms, 4),
                "relative_to_baseline": round(latency_ms / costs.baseline_ms, 4),
                "images": [],
            }
        top = int(np.argmax(probs))
        label = image.label if image.label in classes else None
        if label is not None:
            labelled += 1
            correct += label == classes[top]
        # how sure the first look was: a cascade's first stage's confidence, else the answer's probability
        sure = float(probs[top]) if trace is None or not math.isfinite(trace.confidences[0]) else float(trace.confidences[0])
        group["images"].append({"name": image.name, "url": image.url, "label": label, "prediction": classes[top],
                                "probability": round(float(probs[top]), 4), "confidence": round(sure, 4)})
    for group in groups.values():  # the hardest image first: the heaviest row starts with the hardest of all
        group["images"].sort(key=lambda entry: entry["confidence"])
    ordered = sorted(groups.values(), key=lambda g: (-g["estimated_latency_ms"], g["code"], g["network"] or ""))
    return {
        "operating_point": choice.operating_point,
        "images": len(rows),
        "architectures": len(ordered),
        "accuracy": round(correct / labelled, 4) if labelled else None,
        "groups": ordered,
        "skipped": skipped,
    }
