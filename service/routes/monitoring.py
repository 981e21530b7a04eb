"""`GET /metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.state import State

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
