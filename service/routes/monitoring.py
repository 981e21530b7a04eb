"""`GET /metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import ErrorResponse
from service.security import require_token

# Behind INSTANAS_API_TOKEN when it is set (service/security.py).
router = APIRouter(dependencies=[Depends(require_token)],
                   responses={401: {"model": ErrorResponse}})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(request: Request):
    """Every served model's metrics (label `model`); with several workers, all workers' added up."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
