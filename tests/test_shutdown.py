"""SIGTERM drains (service/server.py): readiness answers 503 for INSTANAS_DRAIN_SECONDS while
requests, old and new, are still served; then requests in flight complete, idle keep-alive
connections are closed cleanly, and the process exits 0 within drain + INSTANAS_SHUTDOWN_TIMEOUT,
slow clients connected or not. A real server under a bounded load: no accepted request is lost."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx

from tests import hostile as h
from tests.conftest import Server

DRAIN_S, SHUTDOWN_S = 2.0, 3.0
JPEG = h.jpeg()


def test_sigterm_drains_serves_and_exits_within_the_bound(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_DRAIN_SECONDS=str(DRAIN_S),
                 INSTANAS_SHUTDOWN_TIMEOUT=str(SHUTDOWN_S), INSTANAS_BODY_TIMEOUT="120", INSTANAS_HEADER_TIMEOUT="120",
                 INSTANAS_KEEP_ALIVE_TIMEOUT="60", INSTANAS_LOG_FORMAT="text")
    stop_load = threading.Event()
    outcomes: list[tuple[float, object, str | None]] = []  # (time, status or error, Connection header)
    lock = threading.Lock()

    def load():
        with httpx.Client(timeout=30) as client:
            while not stop_load.is_set():
                t = time.monotonic()
                try:
                    r = client.post(srv.url + "/classify", content=JPEG, headers={"content-type": "image/jpeg"})
                    outcome = (t, r.status_code, r.headers.get("connection"))
                except httpx.HTTPError as exc:
                    outcome = (t, type(exc).__name__, None)
                with lock:
                    outcomes.append(outcome)

    try:
        # slow and idle clients, connected through the whole shutdown
        trickler = socket.create_connection(("127.0.0.1", srv.port))
        trickler.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 9999\r\n\r\n"
                         b"\xff\xd8")
        half_headers = socket.create_connection(("127.0.0.1", srv.port))
        half_headers.sendall(b"GET /healthz/live HTTP/1.1\r\nHost:")
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        idle.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert h.read_reply(idle, time.monotonic()).status == 200  # now an idle keep-alive connection

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        t_term = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        # A load balancer stops sending once readiness fails: the load stops before the drain ends.
        threading.Timer(DRAIN_S - 0.3, stop_load.set).start()

        # during the drain: not ready, still live, still serving (new connections too)
        readiness, live = [], []
        while time.monotonic() < t_term + DRAIN_S - 0.6:
            r = httpx.get(srv.url + "/healthz/ready", timeout=5)
            readiness.append((r.status_code, r.json()["status"]))
            live.append(httpx.get(srv.url + "/healthz/live", timeout=5).status_code)
            time.sleep(0.1)
        fresh = httpx.post(srv.url + "/classify", content=JPEG, headers={"content-type": "image/jpeg"}, timeout=10)

        # a request in flight when the drain ends: its body arrives over a second, across the shutdown
        in_flight = {}

        def slow_upload():
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                             + f"Content-Length: {len(JPEG)}\r\n\r\n".encode())
                for i in range(4):
                    sock.sendall(JPEG[i * len(JPEG) // 4:(i + 1) * len(JPEG) // 4])
                    time.sleep(0.3)
                in_flight["reply"] = h.read_reply(sock, time.monotonic())

        uploader = threading.Thread(target=slow_upload)
        uploader.start()
        for w in workers:
            w.join(30)

        srv.process.wait(DRAIN_S + SHUTDOWN_S + 10)
        exited = time.monotonic() - t_term
        uploader.join(10)
        idle_after = idle.recv(1)  # b"": closed cleanly (a reset would raise)
        for sock in (trickler, half_headers, idle):
            sock.close()
    finally:
        stop_load.set()
        srv.stop()

    assert srv.process.returncode == 0, srv.log.read_text()[-3000:]
    assert exited <= DRAIN_S + SHUTDOWN_S + 2.0, exited
    assert exited >= DRAIN_S, exited  # it did drain
    assert readiness and readiness[0] == (503, "draining") and set(readiness) == {(503, "draining")}, readiness
    assert set(live) == {200}
    assert fresh.status_code == 200 and fresh.headers.get("connection") == "close"
    # No accepted request lost: every request of the load was answered 200, except those that
    # found the listener closed once the drain was over (refused connections: never accepted).
    statuses = [status for _, status, _ in outcomes]
    assert statuses.count(200) > 0
    lost = [(round(t - t_term, 2), s) for t, s, _ in outcomes
            if s != 200 and not (s == "ConnectError" and t >= t_term + DRAIN_S - 0.05)]
    assert not lost, lost
    served_in_drain = [c for t, s, c in outcomes if t > t_term + 0.2 and s == 200]
    assert served_in_drain and all(c == "close" for c in served_in_drain)  # drained connections close
    # the request in flight when shutdown began completed
    assert in_flight["reply"].status == 200, in_flight
    assert idle_after == b""
    log = srv.log.read_text()
    assert "SIGTERM: draining" in log and "Finished server process" in log
