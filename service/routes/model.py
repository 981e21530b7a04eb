"""`GET /model`: the served bundle's manifest (its operating points included)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.schemas import ErrorResponse
from service.security import require_token
from service.state import State

# Behind INSTANAS_API_TOKEN when it is set (service/security.py).
router = APIRouter(dependencies=[Depends(require_token)],
                   responses={401: {"model": ErrorResponse}})


@router.get("/model", summary="The served bundle's manifest")
async def model(state: State):
    return {"sha256": state.bundle.sha256, **state.manifest.model_dump(mode="json")}
