"""`GET /metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.schemas import ErrorResponse
from service.security import require_token
from service.state import State

# Behind INSTANAS_API_TOKEN when it is set (service/security.py).
router = APIRouter(dependencies=[Depends(require_token)],
                   responses={401: {"model": ErrorResponse}})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
