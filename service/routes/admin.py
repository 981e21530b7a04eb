"""`POST /admin/reload`: swap in bundles (the same folder read again, or another) without a restart."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, Field

from service import reload, reload_file
from service.schemas import ErrorResponse, ModelRef
from service.security import require_token

router = APIRouter(prefix="/admin", dependencies=[Depends(require_token)])


class ReloadRequest(BaseModel):
    path: str | None = Field(default=None, description=(
        "Bundle or model repository folder on the server; default: the one served now."))


class ReloadResponse(BaseModel):
    model: ModelRef = Field(description="The default model from now on (requests that name no model).")
    previous: ModelRef = Field(description="The default model before.")
    models: list[ModelRef] = Field(description="Every model served from now on.")
    seconds: float = Field(description="Loading, verifying and warming up the new bundles.")


@router.post("/reload", response_model=ReloadResponse, summary="Load, verify and warm up bundles, then swap them in",
             responses={code: {"model": ErrorResponse} for code in (401, 409, 422, 503)})
async def reload_bundle(request: Request, body: ReloadRequest | None = Body(default=None)):
    """With several workers, the others reload the same folder right after (service/reload_file.py)."""
    result = await reload.reload(request.app, body.path if body else None)
    reload_file.announce_reload(request.app.state.models.path)
    return result
