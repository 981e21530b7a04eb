"""Overload on loopback: the queue limit holds under a crowd, bodies are not all buffered, and the
service goes past capacity and comes back (scripts/overload.py; figures in docs/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, Server, metric
from tests.hostile import memory_kib

MiB = 1 << 20


def _overload_module():
    spec = importlib.util.spec_from_file_location("overload", ROOT / "scripts" / "overload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




def crowd(url: str, n: int, body: bytes, content_type: str = "image/jpeg", params: dict | None = None):
    """`n` clients sending at the same instant: [(status, seconds, response)]."""
    barrier = threading.Barrier(n)

    def send(_):
        with httpx.Client(timeout=120) as client:
            barrier.wait(60)
            t0 = time.perf_counter()
            r = client.post(url + "/classify", content=body, headers={"content-type": content_type}, params=params)
            return r.status_code, time.perf_counter() - t0, r

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


def assert_refusal(response: httpx.Response, codes=("overloaded",)) -> None:
    assert response.headers.get("retry-after") == "1", response.headers
    assert response.json()["error"]["code"] in codes, response.text


def slow_png() -> bytes:
    """A 700x700 noisy PNG: tens of milliseconds to decode, so 40 of them keep one executor busy."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_queue_never_passes_its_limit_under_forty_clients(tiny_bundle, tmp_path):
    """INSTANAS_MAX_QUEUE=4, one executor thread, 40 clients at once: requests admitted while their
    bodies were still arriving count against the queue, so it never holds more than 4."""
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_MAX_QUEUE="4", INSTANAS_MAX_CONCURRENCY="1",
                 INSTANAS_MAX_BATCH_SIZE="1", INSTANAS_ACCESS_LOG="false")
    try:
        body = slow_png()
        for _ in range(2):
            results = crowd(srv.url, 40, body, "image/png", {"architecture": "all"})
            statuses = [s for s, _, _ in results]
            assert set(statuses) <= {200, 503}, statuses
            refused = [r for s, _, r in results if s == 503]
            assert refused and statuses.count(200) >= 5, statuses
            for response in refused:
                assert_refusal(response)
        peak = metric(srv.url, "instanas_queue_depth_peak")
        assert 1 <= peak <= 4, peak
        assert metric(srv.url, "instanas_queue_depth") == 0
    finally:
        srv.stop()


def test_forty_large_bodies_are_refused_not_buffered(tiny_bundle, tmp_path):
    """40 clients send 9.5 MB at once; at most INSTANAS_MAX_BUFFERED_BYTES (32 MiB: 3 bodies) are
    held at any time, the rest refused at once (503 buffer_full) before their bodies are read."""
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_MAX_BUFFERED_BYTES=str(32 * MiB),
                 INSTANAS_MAX_QUEUE="64", INSTANAS_ACCESS_LOG="false")
    try:
        idle = memory_kib(srv.process.pid)["VmRSS"] * 1024
        body = os.urandom(9_500_000)  # not an image: whoever is read gets 400 not_an_image
        results = crowd(srv.url, 40, body)
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {400, 503}, statuses
        refused = [r for s, _, r in results if s == 503]
        assert len(refused) >= 20, statuses
        for response in refused:
            assert_refusal(response, ("buffer_full",))
        for status, _, response in results:
            if status == 400:
                assert response.json()["error"]["code"] == "not_an_image"
        held = metric(srv.url, "instanas_buffered_body_bytes_peak")
        assert 9_500_000 <= held <= 32 * MiB, held
        assert metric(srv.url, "instanas_buffered_body_bytes") == 0  # every reservation given back
        # Not buffered: far less than 40 bodies of memory (380 MB) was ever used.
        peak = memory_kib(srv.process.pid)["VmHWM"] * 1024
        assert peak - idle < 2 * 32 * MiB + 6 * 10 * MiB, ((peak - idle) / MiB)
        # and the server is fine
        assert httpx.post(srv.url + "/classify", content=slow_png(), headers={"content-type": "image/png"},
                          timeout=30).status_code == 200
    finally:
        srv.stop()


@pytest.mark.slow
def test_past_capacity_and_back(tmp_path):
    """scripts/overload.py on the default bundle: 2 clients, then 64, then 2 again."""
    overload = _overload_module()
    report = overload.run(ROOT / "models" / "cifar10-default", log=tmp_path / "server.log")
    print(overload.table(report))
    before, during, after = (report["phases"][p] for p in ("before", "during", "after"))
    # no error of any kind; every refusal a 503 with Retry-After and its code
    for name, phase in report["phases"].items():
        assert phase["failed"] == 0, (name, phase["failures"])
        assert phase["refusals_without_retry_after"] == 0, name
    assert before["refused"] == 0 and after["refused"] == 0
    assert during["refused"] > 0 and during["served"] > 0  # really past capacity, still serving
    # refusals are immediate: the server's own time to refuse is far below the time to be served
    refusal = report["server_refusal_ms"]
    assert refusal["count"] == during["refused"]
    assert refusal["p99"] <= min(250.0, during["p50_ms"]), (refusal, during["p50_ms"])
    # the queue never passed its limit; memory stayed within the stated bound
    assert report["queue_depth_peak"] <= report["max_queue"]
    assert report["peak_rss_mib"] <= report["rss_bound_mib"]
    # latency recovers
    assert after["p50_ms"] <= 2 * before["p50_ms"] + 5, (before, after)
    assert after["p99_ms"] <= 3 * before["p99_ms"] + 20, (before, after)
    assert report["ready_after"] == 200
