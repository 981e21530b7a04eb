"""Several worker processes on one port (`INSTANAS_WORKERS`): every worker serves, `/metrics`
adds up across them whichever answers, a crashed worker is replaced without losing counts,
a reload reaches every worker, and SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import BIN, Server, metric
from tests.helpers import export_test_bundle
from training.searchspace import build_tiny_space

WORKERS = 2


def worker_pids(server: Server) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()} - {_resource_tracker(server)}


def _resource_tracker(server: Server) -> int | None:
    """multiprocessing's resource tracker, the supervisor's other child (not a worker)."""
    out = subprocess.run(["pgrep", "-P", str(server.process.pid), "-f", "resource_tracker"], capture_output=True,
                         text=True).stdout.split()
    return int(out[0]) if out else None


def wait_started(server: Server, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while server.log.read_text().count("started (pid") < count:
        assert time.time() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.2)


def access_pids(server: Server, path: str) -> list[int]:
    pids = []
    for line in server.log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("path") == path and "status" in record:
                pids.append(record["pid"])
    return pids


def eventually(check, timeout: float = 30) -> None:
    """Until `check()` is true: a worker counts a request just after answering it, and a scrape may
    reach the other worker first."""
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def reloaded_pids(server: Server) -> set[int]:
    return {json.loads(line)["pid"] for line in server.log.read_text().splitlines()
            if line.startswith("{") and json.loads(line).get("message", "").startswith("reloaded:")}


def classify(url: str, jpeg: bytes) -> httpx.Response:
    # a new connection each time, so the kernel spreads them across the workers
    return httpx.post(url + "/classify", content=jpeg, headers={"content-type": "image/jpeg", "connection": "close"},
                      timeout=30)


@pytest.fixture()
def workers_server(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_WORKERS=str(WORKERS),
                 INSTANAS_METRICS_DIR=str(tmp_path / "metrics"))
    wait_started(srv, WORKERS)
    yield srv
    srv.stop()


def test_every_worker_serves_and_metrics_add_up_across_them(workers_server, test_jpegs):
    srv = workers_server
    assert len(worker_pids(srv)) == WORKERS
    codes = []
    for i in range(40):
        response = classify(srv.url, test_jpegs[i % len(test_jpegs)][1])
        assert response.status_code == 200, response.text
        codes.append(response.json()["architecture"]["code"])
    eventually(lambda: len(access_pids(srv, "/classify")) == 40)  # each line is written just after its answer
    assert len(set(access_pids(srv, "/classify"))) == WORKERS  # the kernel gave both workers connections
    executed = sum(c != "0" for code in codes for c in code)  # cells that ran at least one module
    eventually(lambda: metric(srv.url, "instanas_requests_total", endpoint="/classify", status="200") == 40)
    for _ in range(6):  # each scrape may be answered by either worker: all say the same totals
        assert metric(srv.url, "instanas_requests_total", endpoint="/classify", status="200") == 40
        assert metric(srv.url, "instanas_architecture_modules_count") == 40
        assert metric(srv.url, "instanas_module_executions_total") >= executed
        assert metric(srv.url, "instanas_model_info") == 1  # one bundle, served by both: the highest, not the sum
        assert metric(srv.url, "instanas_in_flight_requests") == 0
        assert metric(srv.url, "instanas_workers") == WORKERS
    # a crashed worker is replaced; what it counted stays counted
    victim = sorted(worker_pids(srv))[0]
    survivor = (worker_pids(srv) - {victim}).pop()
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: "died" in srv.log.read_text())  # reaped: its socket is closed, the restart 1 s away
    for _ in range(6):  # meanwhile new connections go to the live worker, not to the dead one's queue
        assert classify(srv.url, test_jpegs[0][1]).status_code == 200
    # The replacement was not serving yet: it listens only after the 1 s restart delay and a whole start-up
    # (a new interpreter loading the bundle), and six requests to the tiny bundle take milliseconds each.
    # (Had they waited on the dead worker's socket, they would have been answered by the replacement.)
    assert srv.log.read_text().count("started (pid") == WORKERS
    eventually(lambda: access_pids(srv, "/classify")[-6:] == [survivor] * 6)
    wait_started(srv, WORKERS + 1)
    assert len(worker_pids(srv)) == WORKERS and victim not in worker_pids(srv)
    eventually(lambda: metric(srv.url, "instanas_requests_total", endpoint="/classify", status="200") == 46)
    assert metric(srv.url, "instanas_workers") == WORKERS  # the dead worker's 1 was dropped, the new one's added


def test_a_reload_reaches_every_worker(workers_server, tmp_path, test_jpegs):
    srv = workers_server
    other = tmp_path / "other"
    export_test_bundle(other, build_tiny_space(), seed=9, name="test")
    before = classify(srv.url, test_jpegs[0][1]).json()["model"]["sha256"]
    reloaded = httpx.post(srv.url + "/admin/reload", json={"path": str(other)}, timeout=120)
    assert reloaded.status_code == 200, reloaded.text
    after = reloaded.json()["model"]["sha256"]
    assert after != before
    # the other worker reloads on the supervisor's SIGHUP, just after: then no worker serves `before`
    eventually(lambda: metric(srv.url, "instanas_model_info", sha256=before) == 0, timeout=60)
    assert {classify(srv.url, test_jpegs[0][1]).json()["model"]["sha256"] for _ in range(12)} == {after}
    # a worker started after the reload serves the reloaded folder too
    os.kill(sorted(worker_pids(srv))[0], signal.SIGKILL)
    wait_started(srv, WORKERS + 1)
    assert {classify(srv.url, test_jpegs[0][1]).json()["model"]["sha256"] for _ in range(12)} == {after}


def test_sigterm_stops_every_worker_and_removes_the_metrics_folder(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_WORKERS=str(WORKERS))
    wait_started(srv, WORKERS)
    pids = worker_pids(srv)
    folder = Path(next(line for line in srv.log.read_text().splitlines() if "metrics in" in line)
                  .split("metrics in ")[1].split('"')[0])
    assert folder.is_dir() and str(folder).startswith("/dev/shm/")
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(60) == 0
    srv.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not folder.exists()


def test_a_bundle_that_fails_stops_the_supervisor_with_status_2(tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(tiny_bundle), str(broken)], check=True)
    (broken / json.loads((broken / "manifest.json").read_text())["head"]["file"]).write_bytes(b"changed")
    done = subprocess.run([str(BIN / "instanas-serve"), "--model", str(broken), "--port", "0", "--workers", "2"],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sha256" in done.stderr and "did not start" in done.stderr


def test_a_reload_while_a_worker_loads_reaches_it_once_it_is_ready(tiny_bundle, tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    # a reload file left by an earlier run is not obeyed: the workers serve --model
    (metrics / "reload.json").write_text(json.dumps({"path": str(tmp_path / "gone"), "pid": 1}))
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_WORKERS=str(WORKERS), INSTANAS_METRICS_DIR=str(metrics))
    try:
        for _ in range(3):  # worker 0 serves, worker 1 is still loading: it must not die of these
            srv.process.send_signal(signal.SIGHUP)
            time.sleep(0.1)
        wait_started(srv, WORKERS)
        assert srv.process.poll() is None and len(worker_pids(srv)) == WORKERS
        eventually(lambda: len(reloaded_pids(srv)) == WORKERS, timeout=60)  # the late one too, once ready
        assert "died" not in srv.log.read_text()
    finally:
        srv.stop()


def test_a_worker_that_cannot_be_restarted_stops_the_supervisor_with_status_2(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(tiny_bundle), str(bundle)], check=True)
    srv = Server(bundle, tmp_path / "server.log", INSTANAS_WORKERS=str(WORKERS))
    wait_started(srv, WORKERS)
    (bundle / json.loads((bundle / "manifest.json").read_text())["head"]["file"]).write_bytes(b"changed")
    os.kill(sorted(worker_pids(srv))[0], signal.SIGKILL)
    assert srv.process.wait(120) == 2
    srv.stop()


def test_keep_alive_connections_opened_at_once_spread_across_the_workers(workers_server, test_jpegs):
    """One SO_REUSEPORT socket per worker: the kernel spreads a burst of new connections by
    address hash. (With one shared socket, whichever worker woke first accepted all 32.)"""
    srv = workers_server
    assert "a socket each, SO_REUSEPORT" in srv.log.read_text()
    connections, each = 32, 2

    async def burst() -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            async def one(i: int) -> None:
                for _ in range(each):
                    response = await client.post(srv.url + "/classify", content=test_jpegs[i % 20][1],
                                                 headers={"content-type": "image/jpeg"})
                    assert response.status_code == 200, response.text

            await asyncio.gather(*[one(i) for i in range(connections)])

    asyncio.run(burst())
    eventually(lambda: len(access_pids(srv, "/classify")) == connections * each)  # logged just after answering
    per_worker = collections.Counter(access_pids(srv, "/classify"))
    # a fair hash puts fewer than 6 of 32 connections on one of 2 workers about once in 10,000 runs
    assert len(per_worker) == WORKERS and min(per_worker.values()) >= 6 * each, per_worker


def test_without_reuse_port_the_workers_share_one_socket(tiny_bundle, tmp_path, test_jpegs):
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_WORKERS=str(WORKERS), INSTANAS_REUSE_PORT="false")
    try:
        wait_started(srv, WORKERS)
        assert "one shared socket" in srv.log.read_text()
        for i in range(10):
            assert classify(srv.url, test_jpegs[i][1]).status_code == 200
    finally:
        srv.stop()


def test_a_second_server_on_the_same_port_is_refused(workers_server, tiny_bundle):
    """SO_REUSEPORT lets sockets of one user share a port: a second supervisor must not join the
    first one's group and take half its connections, but fail as a plain bind does."""
    done = subprocess.run([str(BIN / "instanas-serve"), "--model", str(tiny_bundle), "--port",
                           str(workers_server.port), "--workers", "2"], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert done.returncode == 1 and "address already in use" in done.stderr.lower(), done.stderr[-2000:]
    assert classify(workers_server.url, b"x").status_code == 400  # the first one still answers
