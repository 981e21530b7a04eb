"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.repository import Models
from service.schemas import Health

router = APIRouter()


@router.get("/healthz/live", response_model=Health, summary="The process is up")
async def live():
    return Health(status="ok")


@router.get("/healthz/ready", response_model=Health, responses={503: {"model": Health}},
            summary="Every bundle is loaded, verified and warmed up; requests are served (503 while starting or "
            "draining); `model` is the default model")
async def ready(models: Models):
    default = models.get().model_ref
    if models.serving:
        return Health(status="ready", model=default)
    if models.draining:  # SIGTERM: shutting down after the drain (service/server.py); requests are still served
        return JSONResponse(Health(status="draining", model=default).model_dump(), status_code=503)
    return JSONResponse(Health(status="starting").model_dump(), status_code=503)
