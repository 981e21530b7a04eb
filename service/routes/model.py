"""`GET /model`: the served bundle's manifest (its operating points included)."""

from __future__ import annotations

from fastapi import APIRouter

from service.state import State

router = APIRouter()


@router.get("/model", summary="The served bundle's manifest")
async def model(state: State):
    return {"sha256": state.bundle.sha256, **state.manifest.model_dump(mode="json")}
