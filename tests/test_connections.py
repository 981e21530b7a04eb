"""Slow, idle and too many connections (service/server.py, service/limits.py), on real servers:
a body trickled at a byte a second is cut off within the body timeout, headers within the header
timeout, 300 idle sockets do not stop /healthz/live from answering even when they are more than the
process may open, keep-alive connections end after their limits, and a connection beyond the limit
is refused at once when every other one is busy. The same guards with uvicorn's h11 parser. Responses
are sent on the socket with the interpreter's lock released, the rest left to the transport, and
arrive whole and in order however slowly the client reads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import socket
import struct
import subprocess
import time

import httpx
import pytest

from service import limits
from service import server as server_module
from service.errors import ApiError
from tests import hostile as h
from tests.conftest import BIN, Server, free_port, metric, wait_until

JPEG = h.jpeg()
# How late a loaded machine may act on a timeout, in the upper bounds below: each one is still well short of
# what the test would see without that timeout (the end of a trickle, a client's own socket timeout).
SLACK_S = 5.0




@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("conn") / "server.log", INSTANAS_BODY_TIMEOUT="3",
                 INSTANAS_HEADER_TIMEOUT="2", INSTANAS_KEEP_ALIVE_TIMEOUT="1", INSTANAS_KEEP_ALIVE_MAX_REQUESTS="3",
                 INSTANAS_LOG_FORMAT="text")
    yield srv
    srv.stop()


def test_a_body_at_one_byte_a_second_is_cut_off_within_the_body_timeout(server):
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(JPEG)}\r\n\r\n")
    steps: list = [head.encode()]
    for i in range(20):  # 20 s of trickling, if nobody stopped it
        steps += [JPEG[i:i + 1], 1.0]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(steps[0])
        reply = None
        for step in steps[1:]:
            if isinstance(step, float):
                sock.settimeout(step)
                try:
                    data = sock.recv(65536, socket.MSG_PEEK)
                except TimeoutError:
                    continue
                sock.settimeout(10)
                if data is not None:
                    reply = h.read_reply(sock, t0)
                    break
            else:
                sock.sendall(step)
    elapsed = time.monotonic() - t0
    assert reply is not None and reply.status == 408, reply
    assert reply.json()["error"]["code"] == "request_timeout"
    assert reply.headers.get("connection") == "close"
    assert 2.5 <= elapsed <= 3 + SLACK_S, elapsed  # INSTANAS_BODY_TIMEOUT=3, against 20 s of trickling


def test_a_body_the_server_already_holds_is_read_with_no_timer(monkeypatch):
    """The body timer matters only while the body is arriving: once the server holds all of it, it
    marks the scope (service/server.py) and the body is read with no timer; unmarked, the timer runs."""
    body_limits = limits.BodyLimits(limits.ByteBudget(1 << 20), max_body_bytes=1000, timeout_s=0.05)

    def no_timer(delay):
        raise AssertionError("a timer was set")

    async def whole():
        return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    async def never():
        await asyncio.sleep(3600)

    async def scenario():
        with monkeypatch.context() as patched:
            patched.setattr(asyncio, "timeout", no_timer)
            assert (await body_limits.reader({limits.BODY_ARRIVED: True}, whole, 10)())["body"] == b"x" * 10
        with pytest.raises(ApiError) as refused:
            await body_limits.reader({}, never, 10)()
        assert refused.value.code == "request_timeout"

    asyncio.run(scenario())


def test_headers_must_arrive_within_the_header_timeout(server):
    # INSTANAS_HEADER_TIMEOUT=2; without it the client's own 10 s timeout would end each exchange
    reply = h.raw_exchange(server.port, [b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n"], timeout=10)
    assert reply.status == 408 and reply.json()["error"]["code"] == "request_timeout"
    assert 1.5 <= reply.seconds <= 2 + SLACK_S, reply.seconds
    silent = h.raw_exchange(server.port, [], timeout=10)  # connects and sends nothing: closed, no answer
    assert silent.status is None and 1.5 <= silent.seconds <= 2 + SLACK_S, silent


def test_keep_alive_limits(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        answers = []
        for _ in range(3):
            sock.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(h.read_reply(sock, time.monotonic()))
        assert [a.status for a in answers] == [200, 200, 200]
        assert [a.headers.get("connection") for a in answers] == [None, None, "close"]  # 3 requests at most
        assert sock.recv(1) == b""  # and closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert h.read_reply(sock, time.monotonic()).status == 200
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # idle: closed after INSTANAS_KEEP_ALIVE_TIMEOUT=1 (the socket's own timeout is 10 s)
        assert time.monotonic() - t0 < 1 + SLACK_S


def _low_open_files_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_three_hundred_idle_sockets_do_not_stop_liveness(tiny_bundle, tmp_path):
    """The server may open 256 files; 300 clients connect and send nothing. The connection limit
    (256 - 64 reserved) closes the longest-idle ones for new connections, so /healthz/live answers."""
    srv = Server(tiny_bundle, tmp_path / "server.log", preexec_fn=_low_open_files_limit,
                 INSTANAS_HEADER_TIMEOUT="60", INSTANAS_LOG_FORMAT="text")
    sockets = []
    try:
        assert "at most 192 connections" in srv.log.read_text()
        for _ in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        # Connections are accepted in order, so these come after all 300 are in. Answered at all is the
        # point (plain uvicorn, below, never answers); the bound only says not after a long stall.
        for _ in range(5):
            t0 = time.monotonic()
            live = httpx.get(srv.url + "/healthz/live", timeout=10)
            assert live.status_code == 200 and time.monotonic() - t0 < SLACK_S
        assert httpx.post(srv.url + "/classify", content=JPEG, headers={"content-type": "image/jpeg"},
                          timeout=10).status_code == 200
        assert metric(srv.url, "instanas_connections_closed_total", reason="evicted") >= 300 - 192
        assert metric(srv.url, "instanas_open_connections") <= 192
        assert srv.process.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        srv.stop()


PLAIN_UVICORN = """
import sys, uvicorn
from service.app import create_app
from service.settings import Settings

settings = Settings(model=sys.argv[1])
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_plain_uvicorn_loses_to_the_same_idle_sockets(tiny_bundle, tmp_path):
    """The reproduction, so the test above cannot pass by luck: the same app under plain uvicorn
    (no connection limit) and the same open-files limit stops answering /healthz/live."""
    port = free_port()
    with open(tmp_path / "plain.log", "w") as log:
        process = subprocess.Popen([str(BIN / "python"), "-c", PLAIN_UVICORN, str(tiny_bundle), str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=_low_open_files_limit)
    sockets = []
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.2)
        for _ in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz/live", timeout=3)
    finally:
        for sock in sockets:
            sock.close()
        process.kill()
        process.wait(20)


def test_a_connection_beyond_the_limit_is_refused_when_all_are_busy(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_MAX_CONNECTIONS="2", INSTANAS_BODY_TIMEOUT="10",
                 INSTANAS_LOG_FORMAT="text")
    busy = []
    try:
        for _ in range(2):  # two connections with a request in progress (bodies still arriving)
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            # the server asks for the body once the handler reads it: the request is surely in progress
            assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"ab")
            busy.append(sock)
        reply = h.raw_exchange(srv.port, [b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n"])
        assert reply.status == 503 and reply.json()["error"]["code"] == "overloaded"
        # at once: not once a busy one ends (their bodies would wait for INSTANAS_BODY_TIMEOUT=10)
        assert reply.headers["retry-after"] == "1" and reply.seconds < SLACK_S
    finally:
        for sock in busy:
            sock.close()

    def live() -> bool:
        try:
            return httpx.get(srv.url + "/healthz/live", timeout=10).status_code == 200
        except httpx.TransportError:  # refused while the server has not yet seen the two close
            return False

    try:  # once they are gone, served again
        wait_until(live, "liveness once the busy connections closed")
        assert metric(srv.url, "instanas_connections_closed_total", reason="refused") >= 1
    finally:
        srv.stop()


H11_SERVER = """
import sys
from service import server
from service.app import create_app
from service.settings import Settings

settings = Settings(model=sys.argv[1], port=int(sys.argv[2]), header_timeout=1, body_timeout=1.5)
server.serve(create_app(settings), settings, http="h11", host="127.0.0.1", port=settings.port, log_level="warning")
"""


def test_the_same_guards_with_h11(tiny_bundle, tmp_path):
    port = free_port()
    with open(tmp_path / "h11.log", "w") as log:
        process = subprocess.Popen([str(BIN / "python"), "-c", H11_SERVER, str(tiny_bundle), str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "INSTANAS_DRAIN_SECONDS": "0"})
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.time() < deadline, (tmp_path / "h11.log").read_text()
            time.sleep(0.2)
        both = h.raw_exchange(port, [b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
        assert both.status == 400 and both.json()["error"]["code"] == "bad_request"
        slow = h.raw_exchange(port, [b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n"])
        assert slow.status == 408 and slow.json()["error"]["code"] == "request_timeout"
        body = h.raw_exchange(port, [b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                     b"Content-Length: 50\r\n\r\nabc"])
        assert body.status == 408 and body.seconds < 1.5 + SLACK_S  # body_timeout=1.5; the client's is 10 s
        big = h.raw_exchange(port, [b"GET /healthz/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"])
        assert big.status == 431 and big.json()["error"]["code"] == "headers_too_large", big
        ok = httpx.post(f"http://127.0.0.1:{port}/classify", content=JPEG, headers={"content-type": "image/jpeg"})
        assert ok.status_code == 200
    finally:
        process.terminate()
        process.wait(20)


class _Transport:
    """An asyncio transport as `_LingeringTransport` uses it, over one end of a socket pair: what it is
    given to write is kept in `written` (bytes), as if it waited for room in the socket."""

    def __init__(self, sock: socket.socket, *, tls: bool = False, buffered: int = 0, closing: bool = False):
        self.sock, self.tls, self.buffered, self.closing = sock, tls, buffered, closing
        self.written = b""

    def get_extra_info(self, name):
        return {"socket": self.sock, "ssl_object": object() if self.tls else None}.get(name)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data) -> None:
        self.written += bytes(data)


def _received(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(1 << 20):
            out += chunk
    return out


def _lingering(transport: _Transport) -> server_module._LingeringTransport:
    return server_module._LingeringTransport(transport, loop=None, on_linger=lambda: None)


@pytest.fixture
def pair():
    """A connected socket pair: the server's end (non-blocking), the client's end."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    with ours, peer:
        yield ours, peer


def test_a_write_goes_on_the_socket_when_the_transport_holds_nothing(pair):
    """(service/server.py: the system call made with the interpreter's lock released.)"""
    ours, peer = pair
    transport = _Transport(ours)
    wrapped = _lingering(transport)
    wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    wrapped.write(b"{}")
    assert _received(peer) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    assert transport.written == b""


def test_bytes_wait_behind_what_the_transport_holds(pair):
    ours, peer = pair
    transport = _Transport(ours, buffered=10)
    _lingering(transport).write(b"after")
    assert transport.written == b"after" and _received(peer) == b""


def test_what_the_socket_does_not_take_goes_to_the_transport_in_order(pair):
    ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(4 << 20)  # far more than the socket pair holds
    transport = _Transport(ours)
    _lingering(transport).write(data)
    sent = _received(peer)
    assert 0 < len(sent) < len(data)
    assert sent + transport.written == data


def test_a_socket_error_is_left_to_the_transport_to_report(pair):
    ours, peer = pair
    peer.close()
    transport = _Transport(ours)
    _lingering(transport).write(b"to nobody")  # EPIPE on the socket: the transport's own write reports it
    assert transport.written == b"to nobody"


@pytest.mark.parametrize("state", [{"tls": True}, {"closing": True}])
def test_tls_and_closing_connections_write_through_the_transport(pair, state):
    ours, peer = pair
    transport = _Transport(ours, **state)
    _lingering(transport).write(b"bytes")
    assert transport.written == b"bytes" and _received(peer) == b""


def test_nothing_is_written_after_fin(pair):
    ours, peer = pair
    transport = _Transport(ours)
    wrapped = _lingering(transport)
    wrapped.lingering = True
    wrapped.write(b"late")
    assert transport.written == b"" and _received(peer) == b""


def test_an_empty_write_leaves_the_sockets_error_to_the_transport():
    """A write of no bytes (uvicorn's for an empty body) makes no system call: one would take the
    error the socket holds (a reset from the client), and the transport would never see it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        with ours:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # RST
            time.sleep(0.1)
            ours.setblocking(False)
            transport = _Transport(ours)
            _lingering(transport).write(b"")
            assert transport.written == b""
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


def _replies(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """`count` responses with a Content-Length, read one after another off one connection."""
    buffer, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed after {len(out)} responses"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
        while len(buffer) < length:
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed in response {len(out) + 1}"
            buffer += chunk
        out.append((int(lines[0].split()[1]), buffer[:length]))
        buffer = buffer[length:]
    return out


def test_pipelined_responses_larger_than_the_socket_buffers_arrive_whole_and_in_order(tiny_bundle, tmp_path):
    """A client that reads nothing for a while: the first responses go straight on the socket, then
    the socket's buffers fill, the rest wait in the transport, and every byte arrives in order."""
    srv = Server(tiny_bundle, tmp_path / "server.log")
    try:
        schema = httpx.get(srv.url + "/openapi.json", timeout=10).content
        get = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
        post = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: %d\r\n\r\n" % len(JPEG) + JPEG)
        count = (8 << 20) // len(schema) + 1  # 8 MiB of responses: more than both sockets' buffers hold
        requests = [get] * count + [post] + [get] * 3
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(30)
            sock.connect(("127.0.0.1", srv.port))
            sock.sendall(b"".join(requests))
            time.sleep(1.0)  # nothing read: the server's writes fill the socket and then wait
            replies = _replies(sock, len(requests))
        assert [status for status, _ in replies] == [200] * len(requests)
        assert all(body == schema for _, body in replies[:count] + replies[count + 1:])
        assert json.loads(replies[count][1])["prediction"]["label"]
    finally:
        srv.stop()
