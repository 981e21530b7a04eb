"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.schemas import Health
from service.state import State

router = APIRouter()


@router.get("/healthz/live", response_model=Health, summary="The process is up")
async def live():
    return Health(status="ok")


@router.get("/healthz/ready", response_model=Health, responses={503: {"model": Health}},
            summary="The bundle is loaded and verified; requests are served")
async def ready(state: State):
    if not state.ready:
        return JSONResponse(Health(status="starting").model_dump(), status_code=503)
    return Health(status="ready", model=state.model_ref)
