"""Limits on requests, for every route: `BodyLimits`, applied by the request envelope (service/envelope.py).

- Bytes held: `ByteBudget` bounds the bytes of request bodies held at once, across all requests
  (being read, or read and waiting for or in classification). A request reserves its
  `Content-Length` when its handler first reads the body (so after admission control, and
  before a byte is read), or, without one, each chunk as it arrives; a reservation that would
  pass `INSTANAS_MAX_BUFFERED_BYTES` is refused at once: 503 `buffer_full` with `Retry-After`.
  The bytes are given back when the response has been sent.
- Size: a declared or received body over `INSTANAS_MAX_BODY_BYTES` is 413 `body_too_large`.
- Time: the body must have arrived in full within `INSTANAS_BODY_TIMEOUT` seconds of the first
  read, else 408 `request_timeout` (and the connection closes). One deadline for the whole
  body, not one per read, so a client that trickles a byte a second is cut off as surely as
  one that stops sending, or one whose `Content-Length` promised more than it sends. A body
  the server has already received in full (it says so in the scope, `BODY_ARRIVED`:
  service/server.py) is read with no timer.
- Framing and headers: a request with both Content-Length and Transfer-Encoding is 400
  `bad_request`, one whose request line and headers pass `INSTANAS_MAX_HEADER_BYTES` 431
  `headers_too_large` (httptools refuses both while parsing, service/server.py; h11 does not).

The body refusals are raised from `receive` (`BodyReader`), inside the handler, so the app's error
handlers give them the JSON error shape. (The time to send the request line and headers is bounded below
the app, in service/server.py.)
"""

from __future__ import annotations

import asyncio
import time

from service.errors import ApiError, error_response, retry_after

BODY_ARRIVED = "instanas.body_arrived"  # scope key: True once the server has received the whole body


class ByteBudget:
    """Bytes of request bodies held at once, at most `limit`. Used on the event loop only."""

    def __init__(self, limit: int, on_change=None):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._on_change = on_change  # called with `used` after every change (metrics)

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        if self._on_change:
            self._on_change(self.used)
        return True

    def _give(self, n: int) -> None:
        self.used -= n
        if self._on_change:
            self._on_change(self.used)


class Reservation:
    """One request's share of a ByteBudget; `release()` when its body is no longer held."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.bytes = budget, 0

    def ensure(self, total: int) -> None:
        """Hold at least `total` bytes; ApiError 503 `buffer_full` when the budget cannot."""
        more = total - self.bytes
        if more <= 0:
            return
        if not self.budget._take(more):
            raise ApiError(503, "buffer_full",
                           f"the server holds as many request bodies as it may ({self.budget.limit} bytes); "
                           "retry later", retry_after())
        self.bytes = total

    def release(self) -> None:
        if self.bytes:
            self.budget._give(self.bytes)
            self.bytes = 0


class BodyLimits:
    """The limits on one request's line, headers and body (see the module docstring), applied by
    the request envelope (service/envelope.py) to every request."""

    def __init__(self, budget: ByteBudget, max_body_bytes: int, timeout_s: float, max_header_bytes: int | None = None):
        self.budget, self.max_body_bytes, self.timeout_s = budget, max_body_bytes, timeout_s
        self.max_header_bytes = max_header_bytes

    def refusal(self, size: int, framings: int):
        """The error response for a request whose line and headers (`size` bytes) or framing
        (`framings`: bit 0 Content-Length, bit 1 Transfer-Encoding) are refused; None when it may go on."""
        if framings == 3:
            # Two framings: the way to request smuggling behind a proxy that reads the other one.
            # httptools refuses these itself; h11 lets Transfer-Encoding win, so refuse here too.
            return error_response(400, "bad_request", "the request has both Content-Length and "
                                  "Transfer-Encoding", {"Connection": "close"})
        # httptools' headers are counted while parsed (service/server.py); h11 takes a request
        # that arrives whole in one read whatever its size, so count again here.
        if self.max_header_bytes is not None and size > self.max_header_bytes:
            return error_response(431, "headers_too_large", "the request line and headers exceed "
                                  f"{self.max_header_bytes} bytes", {"Connection": "close"})
        return None

    def reader(self, scope, receive, declared: int | None) -> BodyReader:
        """`receive` with this request's body limits; `declared`: its Content-Length (the first one's)."""
        return BodyReader(self, scope, receive, declared)

    def too_large(self, what: str) -> ApiError:
        return ApiError(413, "body_too_large", f"{what}; the limit is {self.max_body_bytes} bytes",
                        {"Connection": "close"})


class BodyReader:
    """An ASGI `receive` that holds one request's body to its limits: its bytes reserved in the
    budget, its size, its time. Refusals are ApiErrors raised from the call; `release()` gives
    the bytes back once the response is sent."""

    __slots__ = ("limits", "scope", "receive", "declared", "reservation", "deadline", "received", "started", "done")

    def __init__(self, limits: BodyLimits, scope, receive, declared: int | None):
        self.limits, self.scope, self.receive, self.declared = limits, scope, receive, declared
        self.reservation = limits.budget.reservation()
        self.deadline = None
        self.received = 0
        self.started = self.done = False

    async def __call__(self):
        if self.done:  # the body is in: later reads wait for the disconnect, with no limit
            return await self.receive()
        limits = self.limits
        if not self.started:  # the handler's first read: reserve what the client declared
            self.started = True
            if limits.timeout_s and not self.scope.get(BODY_ARRIVED):
                self.deadline = time.monotonic() + limits.timeout_s
            if self.declared is not None:
                if self.declared > limits.max_body_bytes:
                    raise limits.too_large(f"the body is {self.declared} bytes")
                self.reservation.ensure(self.declared)
        try:
            if self.deadline is None:
                message = await self.receive()
            else:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    message = await self.receive()
        except TimeoutError:
            raise ApiError(408, "request_timeout", f"the request body did not arrive within {limits.timeout_s:g} s",
                           {"Connection": "close"}) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > limits.max_body_bytes:
                raise limits.too_large("the body is longer")
            self.reservation.ensure(self.received)
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    def release(self) -> None:
        self.reservation.release()


def document_limits(app) -> None:
    """The OpenAPI document states what the app enforces beyond the route signatures, so a client
    (or a fuzzer) takes no documented-valid request for an invalid one and meets no undocumented
    status: `top_k` at most the models' classes; the served models' names as the `model`
    parameter's values (404 for others); on every operation with a body, the refusals of the
    body limits (408, 413, 503) and the framework's 400 for a body that does not parse; on every
    operation with a path parameter, 404 for a resource that does not exist."""
    from fastapi import FastAPI

    error = {"description": "Error", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    # The Open Inference Protocol's routes (service/routes/v2.py) answer errors in its own shape.
    v2_error = {"description": "Error", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            models = app.state.models
            classes = max(len(s.manifest.classes) for s in models.states.values())
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    if not isinstance(operation, dict):
                        continue
                    responses = operation.setdefault("responses", {})
                    for parameter in operation.get("parameters", []):
                        param_schema = parameter.get("schema", {})
                        for branch in [param_schema, *param_schema.get("anyOf", [])]:
                            if parameter.get("name") == "top_k" and branch.get("type") == "integer":
                                branch["maximum"] = classes
                            if parameter.get("name") == "model" and branch.get("type") == "string":
                                branch["enum"] = list(models.states)  # the served models (404 otherwise)
                        if parameter.get("name") == "model":
                            responses.setdefault("404", error)
                    shape = v2_error if path.startswith("/v2") else error
                    if "requestBody" in operation:
                        for status in ("400", "408", "413", "503"):
                            responses.setdefault(status, shape)
                    if "{" in path:
                        responses.setdefault("404", shape)
            if "ErrorResponse" not in schema.get("components", {}).get("schemas", {}):
                from service.schemas import ErrorDetail, ErrorResponse

                schemas = schema.setdefault("components", {}).setdefault("schemas", {})
                schemas["ErrorDetail"] = ErrorDetail.model_json_schema()
                schemas["ErrorResponse"] = ErrorResponse.model_json_schema(
                    ref_template="#/components/schemas/{model}")
                schemas["ErrorResponse"].pop("$defs", None)
        return app.openapi_schema

    app.openapi = openapi
