"""`instanas-bench` end to end on the smoke bundle, small: every figure it promises is there."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time

import httpx

from tests.conftest import Server, free_port, run_cli


def test_bench_reports_in_process_http_and_cache_figures(smoke_bundle, data_root, tmp_path):
    out = tmp_path / "bench.json"
    done = run_cli("instanas-bench", "--model", str(smoke_bundle), "--data", str(data_root / "test.tar.gz"),
                   "--images", "40", "--requests", "40", "--concurrency", "1,4", "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    ip = result["in_process"]
    for key in ("instanas_per_block", "instanas_fused_cache", "mobilenet_v2_per_block", "mobilenet_v2_fused_cache",
                "mobilenet_v2_one_graph"):
        assert 0 < ip[key]["p50_ms"] <= ip[key]["p99_ms"]
    assert 0 <= ip["fused_cache_hit_rate"] <= 1 and ip["executor_over_fused_graph"] > 0
    # the smoke run exported its static MobileNetV2 twin beside the bundle: that is the baseline used
    assert result["baseline"].endswith("bundle-mobilenet_v2")
    assert [h["concurrency"] for h in result["http"]] == [1, 4]
    assert all(h["errors"] == 0 and h["throughput_rps"] > 0 and h["requests"] == 40 for h in result["http"])
    assert "HTTP concurrency" in done.stdout and "fused cache hit rate" in done.stdout


def test_bench_against_the_naive_server(smoke_bundle, data_root, tmp_path):
    """`--naive --workers 2`: the naive server of the static twin (uvicorn's two worker processes),
    instanas-serve on it and on the bundle (INSTANAS_WORKERS=2), each level on each; the naive
    server (one process) answers what instanas-serve answers for the same bundle."""
    out = tmp_path / "bench.json"
    done = run_cli("instanas-bench", "--model", str(smoke_bundle), "--data", str(data_root / "test.tar.gz"),
                   "--images", "10", "--requests", "30", "--concurrency", "1,4", "--naive", "--workers", "2",
                   "--no-in-process", "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(out.read_text())["workers"] == 2 and "HTTP, 2 processes each" in done.stdout
    compared = json.loads(out.read_text())["against_naive"]
    assert list(compared) == ["naive", "instanas_static", "instanas"]
    for results in compared.values():
        assert [r["concurrency"] for r in results] == [1, 4]
        assert all(r["errors"] == 0 and r["requests"] == 30 and r["throughput_rps"] > 0 for r in results)
    assert "x naive" in done.stdout

    static = smoke_bundle.parent / "bundle-mobilenet_v2"
    jpeg = _first_jpeg(data_root / "test.tar.gz")
    port = free_port()
    naive = subprocess.Popen([sys.executable, "-m", "service.naive", "--model", str(static), "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served = Server(static, tmp_path / "server.log")
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz/ready").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline, "the naive server did not start"
                time.sleep(0.2)
        mine = httpx.post(f"http://127.0.0.1:{port}/classify", content=jpeg).json()
        theirs = httpx.post(served.url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"}).json()
        assert mine["label"] == theirs["prediction"]["label"]
        assert abs(mine["probability"] - theirs["prediction"]["probability"]) < 1e-5
    finally:
        naive.terminate()
        naive.wait(10)
        served.stop()


def _first_jpeg(archive) -> bytes:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar if m.isfile() and m.name.endswith(".jpg"))
        return tar.extractfile(member).read()
