"""The envelope of every HTTP request: one plain ASGI middleware, the app's outermost layer
(service/app.py, `App`).

For each request, `Envelope`

- takes or makes its request id, echoes it in the `X-Request-ID` header of every response,
  errors included, and binds it to the records logged meanwhile (service/logs.py);
- holds it to the limits on its line, headers and body (service/limits.py);
- counts it by endpoint and status and times it (`Metrics.request_done`), and keeps the number
  in progress (`Metrics.active_requests`);
- writes its access line once its response is sent (`logs.AccessLog`);
- answers a POST to /classify with a plainly valid query itself (service/fast_path.py); every
  other request goes on to the routes.

One layer, not a middleware per concern: each layer adds its coroutine frames and a wrapper
around `send` to every request, and on a small model that was a measured share of the request
path (docs/RESULTS.md). The headers are read in one pass for all of them.
"""

from __future__ import annotations

import logging
import time

from service import fast_path, logs
from service.limits import BodyLimits
from service.metrics import Metrics

log = logging.getLogger("instanas.service")


class Envelope:
    """The middleware: see the module docstring. `fast`: whether POST /classify may take the fast
    path; `cors`: whether CORS is on (a request with an `Origin` header then goes to the routes,
    behind the CORS middleware). `on_rejection(code)` counts refusals, as the app's error handler
    does (service/errors.py)."""

    def __init__(self, app, *, metrics: Metrics, limits: BodyLimits, access_log: logs.AccessLog, on_rejection,
                 fast: bool = True, cors: bool = False):
        self.app, self.metrics, self.limits, self.access_log = app, metrics, limits, access_log
        self.on_rejection, self.fast, self.cors = on_rejection, fast, cors

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        # One pass over the headers: the request id, the body's framings and declared length (the
        # first Content-Length, as the server framed the body by it), the content type, an origin,
        # and the size of the request line and headers.
        given = content_type = declared = None
        framings, origin = 0, False
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        for name, value in scope["headers"]:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                if not framings & 1:
                    declared = int(value) if value.isdigit() else None
                framings |= 1
            elif name == b"content-type":
                content_type = value if content_type is None else content_type
            elif name == logs.HEADER:
                given = value if given is None else given
            elif name == b"transfer-encoding":
                framings |= 2
            elif name == b"origin":
                origin = True
        rid = logs.request_id_from(given)
        id_header = (logs.HEADER, rid.encode())
        scope[logs.NOTES_KEY] = {}
        token = logs.bind_request_id(rid)
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != logs.HEADER]
                message = {**message, "headers": [*headers, id_header]}
            await send(message)

        metrics = self.metrics
        metrics.active_requests += 1
        reader = None
        try:
            refusal = self.limits.refusal(size, framings)
            params = None
            if refusal is None:
                reader = self.limits.reader(scope, receive, declared)
                if self.fast and fast_path.takes(scope) and not (self.cors and origin):
                    params = fast_path.parse_query(scope.get("query_string", b""))
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            elif params is None:
                await self.app(scope, reader, send_with_id)
            else:
                status = await fast_path.answer(scope, reader, send, content_type, params, id_header,
                                                self.on_rejection)
        except Exception:
            if status is None:  # unhandled, no response begun (the fast path's): answered and logged here
                log.exception("unhandled error")
                await logs.internal_error(scope)(scope, receive, send_with_id)
            raise
        else:
            logs.unbind_request_id(token)
        finally:
            if reader is not None:
                reader.release()
            metrics.active_requests -= 1
            status = status or 500
            seconds = time.perf_counter() - t0
            metrics.request_done(getattr(scope.get("route"), "path", "unmatched"), status, seconds)
            self.access_log.write(scope, rid, status, seconds * 1e3)
