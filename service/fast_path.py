"""POST /classify without the framework's per-request machinery.

The route in service/routes/classify.py declares /classify for the OpenAPI document and serves it;
but for every request FastAPI also passes it through its exception middleware and router, solves
the route's dependencies and validates its query parameters through pydantic, a cost of the same
order as the static baseline's model at batch 1 (scripts/inprocess_naive.py measures the path).
The request envelope (service/envelope.py: request id, access log, limits, request metrics; every
request alike) answers a POST to /classify itself (`answer`) when its query parameters are plainly
valid (`parse_query`): each named at most once, `top_k` a positive integer, `max_latency_ms` a
positive decimal, the strings non-empty. It then calls what the route calls
(`routes.classify.answer`), so the answer, every refusal and every metric are the route's.
Anything else, including every query the route would refuse, goes on to the app's routes.
"""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl

from service.errors import ApiError, error_response
from service.routes import classify

PATH = "/classify"
ROUTE = next(r for r in classify.router.routes if r.path == PATH)
_INTEGER = re.compile(r"[1-9][0-9]{0,8}")
_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?")


def parse_query(query: bytes) -> dict | None:
    """The keyword arguments of `routes.classify.answer` from a query string, or None where the
    route's own validation should decide (a repeated or empty parameter, a number in any other form)."""
    params = {"model": None, "top_k": None, "operating_point": None, "max_latency_ms": None, "architecture": "auto"}
    if not query:
        return params
    seen = set()
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)  # as Starlette reads a query
    for key, value in pairs:
        if key not in params:
            continue  # as the route: parameters it does not declare are ignored
        if key in seen or not value:
            return None
        seen.add(key)
        if key == "top_k":
            if not _INTEGER.fullmatch(value):
                return None
            params[key] = int(value)
        elif key == "max_latency_ms":
            if not _DECIMAL.fullmatch(value) or not math.isfinite(float(value)) or float(value) <= 0:
                return None
            params[key] = float(value)
        else:
            params[key] = value
    return params


def takes(scope) -> bool:
    """Whether the request is a POST to /classify that the fast path may answer (its query aside)."""
    return scope["path"] == PATH and scope["method"] == "POST" and not scope.get("root_path")


async def answer(scope, receive, send, content_type: bytes | None, params: dict, extra_header: tuple,
                 on_rejection) -> int:
    """Answer POST /classify as its route would, with `params` from `parse_query`, adding
    `extra_header` (the request id) to the response; the status sent. `on_rejection(code)` counts
    refusals, as the app's error handler does (service/errors.py)."""
    scope["route"] = ROUTE  # as the router would have set it: the request metrics label by its path
    try:
        body = await classify.answer(scope["app"].state.models, scope, receive,
                                     content_type.decode("latin-1") if content_type else "", **params)
    except ApiError as exc:
        on_rejection(exc.code)
        response = error_response(exc.status, exc.code, exc.message, exc.headers)
        response.raw_headers.append(extra_header)
        await response(scope, receive, send)
        return exc.status
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
                            extra_header]})
    await send({"type": "http.response.body", "body": body})
    return 200
