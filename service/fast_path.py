"""POST /classify without the framework's per-request machinery.

The route in service/routes/classify.py declares /classify for the OpenAPI document and serves it;
but for every request FastAPI also passes it through its exception middleware and router, solves
the route's dependencies and validates its query parameters through pydantic, a cost of the same
order as the static baseline's model at batch 1 (scripts/inprocess_naive.py measures the path).
`FastClassify` sits below this app's middlewares
(access log, body limits, request metrics: they see every request alike) and answers a POST to
/classify itself when its query parameters are plainly valid: each named at most once, `top_k` a
positive integer, `max_latency_ms` a positive decimal, the strings non-empty. It then calls what
the route calls (`routes.classify.answer`), so the answer, every refusal and every metric are the
route's. Anything else, including every query the route would refuse, goes on to the app's routes.
"""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl

from service.errors import ApiError, error_response
from service.routes import classify

PATH = "/classify"
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


class FastClassify:
    """The ASGI middleware: see the module docstring. `on_rejection(code)` counts refusals, as the
    app's error handler does (service/errors.py)."""

    def __init__(self, app, on_rejection):
        self.app, self.on_rejection = app, on_rejection
        # the /classify route, as the router would have set it in the scope: request metrics label by its path
        self.route = next(r for r in classify.router.routes if r.path == PATH)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        params = parse_query(scope.get("query_string", b""))
        if params is None or scope.get("root_path"):
            return await self.app(scope, receive, send)
        scope["route"] = self.route
        content_type = ""
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
                break
        try:
            body = await classify.answer(scope["app"].state.models, scope, receive, content_type, **params)
        except ApiError as exc:
            self.on_rejection(exc.code)
            return await error_response(exc.status, exc.code, exc.message, exc.headers)(scope, receive, send)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
