"""API errors: one JSON shape, `{"error": {"code", "message"}}`, for every refusal of `/classify` and co."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import ErrorResponse

log = logging.getLogger("instanas.service")

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 408, 413, 415, 422, 503)}


RETRY_AFTER_S = 1  # what every 503 tells the client to wait before it tries again


def retry_after() -> dict[str, str]:
    """The `Retry-After` header of a 503 (as HTTP headers for an ApiError or a response)."""
    return {"Retry-After": str(RETRY_AFTER_S)}


def retry_after_raw() -> tuple[bytes, bytes]:
    """The same header, as the (name, value) bytes the server writes below the app."""
    return b"retry-after", str(RETRY_AFTER_S).encode()


class ApiError(Exception):
    """A refusal with an HTTP status, a stable `code` for clients, and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error={"code": code, "message": message}).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI, on_rejection) -> None:
    """Route every error through `error_response`; `on_rejection(code)` counts refusals."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        on_rejection(exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        on_rejection("invalid_request")
        return error_response(422, "invalid_request", details)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server failed to handle this request; see its log")
