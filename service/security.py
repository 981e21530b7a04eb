"""Optional access control: a bearer token for the operator's endpoints, and CORS.

With `INSTANAS_API_TOKEN` set, `GET /model`, `GET /metrics` and everything under `/admin/`
need `Authorization: Bearer <token>`; otherwise 401 `unauthorized` with `WWW-Authenticate:
Bearer`. Classification, the health probes and the OpenAPI document stay open. Unset (the
default), nothing is checked: keep the port private (the admin endpoints included).

CORS is off unless `INSTANAS_CORS_ORIGINS` lists origins (comma-separated, or `*`): browsers
on those origins may then call the API.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.middleware.cors import CORSMiddleware

from service.errors import ApiError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="instanas"'}


async def require_token(request: Request) -> None:
    """A route dependency: passes when no token is configured or the request carries it."""
    token = request.app.state.settings.api_token
    if token is None:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), expected):
        message = ("this endpoint needs an 'Authorization: Bearer <token>' header" if not scheme
                   else "the bearer token is not valid")
        raise ApiError(401, "unauthorized", message, dict(CHALLENGE))


def install_cors(app, settings) -> None:
    origins = settings.cors_origin_list
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["Retry-After", "X-Request-ID"], max_age=600)
