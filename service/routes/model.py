"""`GET /model`: a served bundle's manifest (its operating points included); `GET /models`: the names."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from service.repository import Models
from service.schemas import ErrorResponse
from service.security import require_token

# Behind INSTANAS_API_TOKEN when it is set (service/security.py).
router = APIRouter(dependencies=[Depends(require_token)],
                   responses={401: {"model": ErrorResponse}})


@router.get("/model", summary="A served bundle's manifest", responses={404: {"model": ErrorResponse}})
async def model(models: Models, model: str | None = Query(None, description="Its name; default: the default model.")):
    state = models.get(model)
    return {"sha256": state.bundle.sha256, **state.manifest.model_dump(mode="json")}


@router.get("/models", summary="The served models, and the default one")
async def served_models(models: Models):
    return {"default": models.default, "models": models.refs()}
