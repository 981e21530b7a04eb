"""The HTTP server: uvicorn, with the connection limits it lacks and a shutdown that drains.

uvicorn has a keep-alive timeout and a graceful-shutdown timeout, but nothing bounds the time
a client may take to send a request's headers, the number of connections held open (so idle
sockets can use up the process's file descriptors and nothing answers, not even
/healthz/live), or the requests one keep-alive connection may send; and on SIGTERM it stops
accepting at once. In-process, with no proxy in front:

- `Guard`, mixed into uvicorn's own HTTP protocol (httptools where installed, else h11):
  * the request line and headers must arrive within `INSTANAS_HEADER_TIMEOUT` seconds of the
    connection opening or of the first byte of the next request (408, closed); headers larger
    than `INSTANAS_MAX_HEADER_BYTES` get 431; an idle keep-alive connection is closed after
    `INSTANAS_KEEP_ALIVE_TIMEOUT` (uvicorn's timer), and after `INSTANAS_KEEP_ALIVE_MAX_REQUESTS`
    requests the response says `Connection: close`;
  * at most `INSTANAS_MAX_CONNECTIONS` connections (and never more than the open-files limit
    leaves room for): a new one beyond it closes the connection idle for longest (no request
    in progress), or, when every connection is busy, is answered 503 `overloaded` and closed;
  * requests that are not valid HTTP/1.1 (including both Content-Length and Transfer-Encoding)
    get uvicorn's 400, in the API's JSON error shape.
- `InstanasServer`, uvicorn's server with other signal handling: SIGTERM starts a drain
  (readiness answers 503 `draining` for `INSTANAS_DRAIN_SECONDS` while requests are still
  served, each response then closing its connection), then a graceful shutdown that resets
  no request a client sent (`InstanasServer.shutdown`): stop accepting (the connections the
  kernel already queued accepted first), answer any new request 503 `draining` with
  `Connection: close`, let requests in flight finish for at most `INSTANAS_SHUTDOWN_TIMEOUT`
  seconds (then answer them 503 `draining` too), close idle connections as their keep-alive
  timer says or at that timeout, and exit 0. A second SIGTERM, or SIGINT (Ctrl+C), skips the
  drain; SIGINT twice forces the exit. SIGHUP reloads the bundle (service/reload.py).
- Connections are closed gracefully (`_LingeringTransport`): FIN after the last response, then
  what the client still sends is read and discarded until it closes its side, for at most
  `LINGER_S` (0.5 s), so that a client still sending is not reset before it reads its answer
  (an idle connection evicted for a new one is closed at once).

The time to send a body is bounded in the app (service/limits.py, 408 in the JSON shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict

import uvicorn

from service import heap, limits, reload
from service.app import create_app
from service.bundle import BundleError
from service.errors import retry_after, retry_after_raw
from service.reload_file import reload_target
from service.settings import Settings

log = logging.getLogger("instanas.service")

# Descriptors kept for everything but client connections: the listening socket, logs, the
# bundle's files while loading, onnxruntime, the event loop's own.
RESERVED_FDS = 64
# Longest a closed connection waits for its client to close its side (see _LingeringTransport).
LINGER_S = 0.5
# At shutdown, how long the listening sockets stay open after the kernel stops taking new connections,
# so that handshakes already under way complete and are accepted (a round trip is enough).
HANDSHAKE_S = 0.1


def _json_response(status: int, reason: str, code: str, message: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def connection_limit(wanted: int) -> int:
    """`wanted`, lowered to what the open-files limit (RLIMIT_NOFILE, soft) leaves for clients."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - RESERVED_FDS))


class Connections:
    """The open client connections of one server, idle ones in least-recently-used order."""

    def __init__(self, limit: int, metrics=None):
        self.limit = limit
        self.open: set = set()
        self.idle: OrderedDict = OrderedDict()  # connections with no request in progress, oldest first
        self.draining = False  # SIGTERM: responses close their connection
        self.stopping = False  # the drain is over: requests are answered 503 `draining` (_AnswerWhenStopping)
        self.evicted = 0
        self.refused = 0
        self.metrics = metrics

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.open_connections.set(len(self.open))

    def add(self, conn) -> bool:
        """Count a new connection; False when it must be refused (the limit is reached and every
        other connection has a request in progress)."""
        self.open.add(conn)
        self.idle[conn] = None
        while len(self.open) > self.limit:
            victim = next((c for c in self.idle if c is not conn), None)
            if victim is None:
                self.discard(conn)
                self.refused += 1
                if self.metrics is not None:
                    self.metrics.connections_closed.labels("refused").inc()
                return False
            self.discard(victim)
            self.evicted += 1
            if self.metrics is not None:
                self.metrics.connections_closed.labels("evicted").inc()
            victim.transport.close_now()  # its descriptor is what the new connection needs
        self._gauge()
        return True

    def in_progress(self) -> int:
        """Requests whose headers are in and whose response is not finished (their handler may not
        have started yet)."""
        return len(self.open) - len(self.idle)

    def busy(self, conn) -> None:
        self.idle.pop(conn, None)

    def rest(self, conn) -> None:
        if conn in self.open:
            self.idle[conn] = None
            self.idle.move_to_end(conn)

    def discard(self, conn) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)
        self._gauge()


class _RecordingParser:
    """httptools' parser, remembering why it refused the last bytes (for the 400's message)."""

    def __init__(self, parser, owner):
        self._parser, self._owner = parser, owner

    def feed_data(self, data):
        try:
            return self._parser.feed_data(data)
        except Exception as exc:
            self._owner._parse_error = str(exc)
            raise

    def __getattr__(self, name):
        return getattr(self._parser, name)


class _LingeringTransport:
    """A client connection's transport whose close() does not reset the connection.

    Closing a socket that still holds bytes it has not read (the rest of a body answered early,
    a request the client sent as the server closed) makes the kernel send RST rather than FIN,
    and a client that gets RST may lose the response it has not read yet, or a request it just
    sent, without knowing whether it was served. So close() sends FIN once what was written has
    gone (write_eof), then reads and discards whatever still comes until the client closes its
    side, or LINGER_S passes (Apache's "lingering close"). close_now() closes at once.

    write() makes the system call with the interpreter's lock released, where it can: uvloop's own
    write sends on the socket holding the lock, and on loopback under load the kernel's work for
    that call (and the client it wakes taking the core) then stops the executor threads' Python
    too. It sends on the socket's descriptor directly when nothing is waiting in the transport's
    buffer, and hands the transport whatever the socket did not take, so the bytes keep their
    order; a TLS connection, or one closing, writes through the transport as before."""

    def __init__(self, transport, loop, on_linger):
        self._transport, self._loop, self._on_linger = transport, loop, on_linger
        self.lingering = False
        self._fd = _plain_socket_fd(transport)

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        self._on_linger()
        if not self._transport.can_write_eof():  # TLS: no half-close
            self._transport.close()
            return
        self._transport.write_eof()
        self._transport.resume_reading()  # to see the client's FIN; the protocol discards what comes before it
        self._loop.call_later(LINGER_S, self._transport.close)

    def close_now(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.lingering or not data:
            # FIN was sent: nothing may follow it. No bytes: no system call, which would take (and so
            # hide from the transport) an error the socket holds, such as the client's reset.
            return
        transport = self._transport
        if self._fd >= 0 and not transport.is_closing() and not transport.get_write_buffer_size():
            try:
                sent = os.write(self._fd, data)  # the interpreter's lock released for the call
            except OSError:  # no room (the transport waits for it), or an error the transport reports its way
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = memoryview(data)[sent:]
        transport.write(data)

    def __getattr__(self, name):
        return getattr(self._transport, name)


def _plain_socket_fd(transport) -> int:
    """The descriptor of a transport's socket where bytes may be sent on it directly (not TLS), else -1."""
    if transport.get_extra_info("ssl_object") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else -1
    except (AttributeError, OSError):
        return -1


class Guard:
    """Mixed in before uvicorn's HTTP protocol class; configured by `protocol_class`."""

    guard_connections: Connections  # (uvicorn's protocol has its own `connections`, a set)
    header_timeout: float
    max_header_bytes: int
    max_requests: int

    def connection_made(self, transport) -> None:
        transport = _LingeringTransport(transport, self.loop, lambda: self.guard_connections.rest(self))
        super().connection_made(transport)
        self._seen_cycle = None
        self._requests = 0
        self._header_bytes = 0
        self._header_timer = None
        self._parse_error = ""
        self._parsed_header_bytes = 0  # of the request being parsed (httptools' callbacks)
        self._headers_too_large = False
        if hasattr(self, "parser") and self.parser is not None:  # httptools
            self.parser = _RecordingParser(self.parser, self)
        if not self.guard_connections.add(self):
            transport.write(_json_response(503, "Service Unavailable", "overloaded",
                                           "the server holds as many connections as it may; retry later",
                                           tuple(retry_after().items())))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        self.guard_connections.discard(self)
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        """No request in progress, and the previous one (if any) was read in full: the bytes
        arriving now are a new request's line and headers."""
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and not cycle.more_body)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # closing: discarded (see _LingeringTransport)
            return
        waiting = self._waiting_for_headers()
        super().data_received(data)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # the headers of a new request are in
            self._seen_cycle = cycle
            self._requests += 1
            self._header_bytes = 0
            self._cancel_header_timer()
            self.guard_connections.busy(self)
            if self._requests >= self.max_requests or self.guard_connections.draining:
                cycle.keep_alive = False  # answered with `Connection: close`
            return
        if cycle is None or cycle.response_complete:
            # Part of a request line and headers (or the rest of a body answered early, discarded).
            if waiting:
                self._header_bytes += len(data)
                if self._header_bytes > self.max_header_bytes:
                    self._close_with(431, "Request Header Fields Too Large", "headers_too_large",
                                     f"the request line and headers exceed {self.max_header_bytes} bytes")
                    return
            if self._header_timer is None:
                self._arm_header_timer()

    # httptools' callbacks (h11 bounds its headers itself: h11_max_incomplete_event_size).
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_header_bytes = 0

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body:  # the whole body is in: reading it needs no timer
            cycle.scope[limits.BODY_ARRIVED] = True

    def on_url(self, url: bytes) -> None:
        self._parsed_header_bytes += len(url)
        if self._parsed_header_bytes > self.max_header_bytes:
            self._refuse_headers()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_header_bytes += len(name) + len(value) + 4  # (counted inline: called for every header)
        if self._parsed_header_bytes > self.max_header_bytes:
            self._refuse_headers()
        super().on_header(name, value)

    def _refuse_headers(self) -> None:
        self._headers_too_large = True
        raise ValueError("the request line and headers are too large")  # the parser stops: send_400_response

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_headers():
            self.guard_connections.rest(self)

    def shutdown(self) -> None:
        """Called by uvicorn's graceful shutdown, after the drain. uvicorn closes a connection with
        no request in progress at once, but its client may be sending one at that instant: the
        request would be reset, or see the connection close after it was sent, and the client
        could not know whether it was served. So an idle connection is left open, to be closed by
        its keep-alive or header timer as at any other time (or when the shutdown timeout ends),
        and a request arriving on it meanwhile is answered 503 `draining` with `Connection: close`
        (_AnswerWhenStopping); one whose line and headers are partly in gets that answer now."""
        if self.transport.is_closing():
            return
        if not self._waiting_for_headers():
            super().shutdown()  # a request in progress: its response closes the connection
        elif self._header_bytes:
            self._close_with(503, "Service Unavailable", "draining", "the server is shutting down",
                             tuple(retry_after().items()))

    def send_400_response(self, msg: str) -> None:
        if self._headers_too_large:
            self._close_with(431, "Request Header Fields Too Large", "headers_too_large",
                             f"the request line and headers exceed {self.max_header_bytes} bytes")
            return
        detail = f": {self._parse_error}" if getattr(self, "_parse_error", "") else ""
        self._close_with(400, "Bad Request", "bad_request", f"the request is not valid HTTP/1.1{detail}")

    def _close_with(self, status: int, reason: str, code: str, message: str,
                    extra: tuple[tuple[str, str], ...] = ()) -> None:
        if not self.transport.is_closing():
            metrics = self.guard_connections.metrics
            if metrics is not None:
                metrics.rejections.labels(code).inc()
            self.transport.write(_json_response(status, reason, code, message, extra))
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return
        if self._header_bytes:
            self._close_with(408, "Request Timeout", "request_timeout",
                             f"the request headers did not arrive within {self.header_timeout:g} s")
        else:  # nothing was sent: just close
            self.transport.close()


def protocol_class(http: str, connections: Connections, settings) -> type:
    """uvicorn's protocol class for `http` ("httptools" or "h11") with `Guard` mixed in."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type("InstanasHttpProtocol", (Guard, base), {
        "guard_connections": connections, "header_timeout": settings.header_timeout,
        "max_header_bytes": settings.max_header_bytes, "max_requests": settings.keep_alive_max_requests})


class _AnswerWhenStopping:
    """The app as uvicorn runs it. Once the drain is over (`Connections.stopping`), a request is
    answered 503 `draining` with `Connection: close` and not served; so is one still running when
    the shutdown timeout cancels it, if it had not begun its response (uvicorn would send 500)."""

    def __init__(self, app, connections: Connections):
        self.app, self.connections = app, connections

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.connections.stopping:
            return await self._draining(send)
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            # whether the response began: uvicorn's request cycle knows (`send` is its method), with
            # no wrapper around every send to find out; a server that does not say is taken to have begun
            if getattr(getattr(send, "__self__", None), "response_started", True) or not self.connections.stopping:
                raise
            await self._draining(send)

    async def _draining(self, send) -> None:
        if self.connections.metrics is not None:
            self.connections.metrics.rejections.labels("draining").inc()
        body = json.dumps({"error": {"code": "draining", "message": "the server is shutting down"}}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), retry_after_raw()]})
        await send({"type": "http.response.body", "body": body})


# A classic BPF socket filter, as the kernel runs it on a TCP socket (the TCP header at offset 0):
# drop a segment with SYN set and ACK clear, the first of a new connection; keep every other.
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]: the flags byte
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else keep
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep it whole
)
SO_ATTACH_FILTER = 26  # Linux (asm-generic/socket.h)


def _refuse_new_connections(listener) -> bool:
    """Have the kernel ignore new connections to the listening socket `listener` (their SYNs are
    dropped: the client retries, and is refused once the socket is closed), while those already
    queued stay to be accepted. False where that cannot be done (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _DROP_SYN))
    program = struct.pack("HL", len(_DROP_SYN), ctypes.addressof(code))  # struct sock_fprog
    try:
        with socket.socket(fileno=os.dup(listener.fileno())) as sock:  # the event loop's may be a wrapper
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
    except OSError as exc:
        log.warning("cannot stop new connections before closing the listening socket: %s", exc)
        return False
    return True


class InstanasServer(uvicorn.Server):
    """uvicorn's server; SIGTERM drains first, SIGHUP reloads the bundle (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app, settings, connections: Connections, on_serving=None):
        super().__init__(config)
        self.app, self.settings, self.connections, self.on_serving = app, settings, connections, on_serving
        self._drain_until: float | None = None
        self._signals: list[int] = []  # seen by the handler, logged on the loop
        self._reloads = 0  # SIGHUPs not yet acted on
        self._tasks: set[asyncio.Task] = set()

    @contextlib.contextmanager
    def capture_signals(self):
        previous = signal.signal(signal.SIGHUP, self._hangup) if _main_thread() else None
        try:
            with super().capture_signals():
                yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGHUP, previous)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        heap.freeze()  # everything start-up made, out of the collector's way (service/heap.py)
        if self.on_serving is not None and self.started:  # accepting, and its signal handlers in place
            self.on_serving()

    def _hangup(self, sig, frame) -> None:
        self._reloads += 1

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded for uvicorn to re-raise after the shutdown: a drained exit is a clean one (0).
        self._signals.append(sig)
        if sig == signal.SIGTERM and self._drain_until is None and not self.should_exit \
                and self.settings.drain_seconds > 0:
            self._drain_until = time.monotonic() + self.settings.drain_seconds
            self._start_draining()
            return
        self._start_draining()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    def _start_draining(self) -> None:
        self.connections.draining = True
        models = getattr(self.app.state, "models", None)
        if models is not None:
            models.draining = True

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's graceful shutdown, without resetting a client that sent a request:
        - Closing a listening socket resets the connections the kernel has queued on it but the
          server not yet accepted, and their clients may have sent a request. So first the kernel
          stops taking new connections, and the queued ones are accepted (and answered 503
          `draining`) before the socket is closed.
        - Idle connections stay open, and requests arriving then are answered (Guard.shutdown).
        - Connections are closed gracefully (_LingeringTransport), those left at the end too.
        Requests in flight get INSTANAS_SHUTDOWN_TIMEOUT from the drain's end, the accepting included."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.connections.stopping = True
        listeners = [sock for server in getattr(self, "servers", ()) for sock in (server.sockets or ())]
        if listeners and not self.force_exit and all(_refuse_new_connections(sock) for sock in listeners):
            await asyncio.sleep(max(0.0, min(HANDSHAKE_S, deadline - time.monotonic())))
            while any(_has_queued(sock) for sock in listeners) and time.monotonic() < deadline \
                    and not self.force_exit:
                await asyncio.sleep(0.01)  # the event loop accepts them
        # what is left of the timeout, for uvicorn's wait for requests in flight
        self.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())
        await super().shutdown(sockets)
        await self._close_the_rest()

    async def _close_the_rest(self) -> None:
        """After the shutdown timeout: requests cancelled answer (_AnswerWhenStopping), then every
        connection left (idle ones too) is closed, gracefully for at most LINGER_S, then at once."""
        end = time.monotonic() + LINGER_S
        while self.server_state.tasks and time.monotonic() < end and not self.force_exit:
            await asyncio.sleep(0.01)
        for conn in list(self.server_state.connections):
            conn.transport.close()
        while self.server_state.connections and time.monotonic() < end and not self.force_exit:
            await asyncio.sleep(0.01)
        for conn in list(self.server_state.connections):
            conn.transport.close_now()

    async def on_tick(self, counter: int) -> bool:
        while self._signals:
            sig = signal.Signals(self._signals.pop(0)).name
            if self._drain_until is not None and not self.should_exit:
                log.info("%s: draining for %g s (readiness 503), then shutting down", sig, self.settings.drain_seconds)
            else:
                log.info("%s: shutting down (in-flight requests get %g s)", sig, self.settings.shutdown_timeout)
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        if self._reloads and not self.should_exit and not reload.in_progress(self.app):  # else: after that one
            self._reloads = 0
            path = reload_target(self.app.state.models.path)  # with several workers: the folder last reloaded
            task = asyncio.ensure_future(reload.reload_logged(self.app, str(path), "SIGHUP"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await super().on_tick(counter)


def _has_queued(listener) -> bool:
    """A connection is waiting in the listening socket's accept queue (it reads as readable)."""
    poll = select.poll()  # not select.select: it fails on descriptors past 1023
    poll.register(listener.fileno(), select.POLLIN)
    return bool(poll.poll(0))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def serve(app, settings, *, http: str = "httptools", sockets: list | None = None, on_serving=None,
          **uvicorn_options) -> None:
    """Run `app` until a signal stops it (see the module docstring); `http` is uvicorn's HTTP
    implementation to guard ("httptools" or "h11"), `sockets` listening sockets already bound
    (a worker's, service/workers.py), `on_serving()` is called once it accepts requests,
    `uvicorn_options` go to uvicorn.Config (host, port, loop, log_level, access_log...)."""
    metrics = getattr(app.state, "metrics", None)
    limit = connection_limit(settings.max_connections)
    if limit < settings.max_connections:
        log.warning("at most %d connections (INSTANAS_MAX_CONNECTIONS=%d, but the open-files limit is %d)",
                    limit, settings.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    connections = Connections(limit, metrics)
    if metrics is not None:  # what service/batching.py's inline path checks: the server's count, parsed requests included
        metrics.requests_in_progress = connections.in_progress
    config = uvicorn.Config(_AnswerWhenStopping(app, connections), http=protocol_class(http, connections, settings),
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_keep_alive=settings.keep_alive_timeout,
                            timeout_graceful_shutdown=settings.shutdown_timeout, **uvicorn_options)
    InstanasServer(config, app, settings, connections, on_serving).run(sockets=sockets)


def fast_server() -> dict[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools where installed (the serve extra),
    else asyncio and h11."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    return {"loop": "uvloop" if found["uvloop"] else "asyncio", "http": "httptools" if found["httptools"] else "h11"}


def run(settings: Settings, sockets: list | None = None, on_serving=None) -> int:
    """Load every bundle and serve until a signal stops the server: on `settings`' host and port,
    or on `sockets` already bound (a worker's, service/workers.py). `on_serving()` is called once
    the server accepts requests and handles its signals. 2 when a bundle cannot be served."""
    try:
        app = create_app(settings)
    except BundleError as exc:
        print(f"instanas-serve: cannot serve the bundle: {exc}", file=sys.stderr, flush=True)
        return 2
    models = app.state.models
    for state in models.states.values():
        logging.getLogger("instanas.service").info(
            "serving %s %s (manifest sha256 %s%s) on http://%s:%d", state.manifest.name, state.manifest.version,
            state.bundle.sha256, ", the default" if state.name == models.default else "", settings.host, settings.port)
    # The access log is service.logs.AccessLog's (INSTANAS_ACCESS_LOG), not uvicorn's.
    serve(app, settings, sockets=sockets, on_serving=on_serving, host=settings.host, port=settings.port,
          log_level=settings.log_level, access_log=False, log_config=None, **fast_server())
    return 0
