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
            summary="The bundle is loaded, verified and warmed up; requests are served (503 while starting or draining)")
async def ready(state: State):
    if state.draining:  # SIGTERM: shutting down after the drain (service/server.py); requests are still served
        return JSONResponse(Health(status="draining", model=state.model_ref).model_dump(), status_code=503)
    if not state.ready:
        return JSONResponse(Health(status="starting").model_dump(), status_code=503)
    return Health(status="ready", model=state.model_ref)
