"""`instanas-bench` end to end on the smoke bundle, small: every figure it promises is there."""

from __future__ import annotations

import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import tarfile
import time

import httpx
import numpy as np

from service import bench
from service.metrics import sample
from tests.conftest import ROOT, Server, free_port, run_cli

_spec = importlib.util.spec_from_file_location("feature_prices", ROOT / "scripts" / "feature_prices.py")
feature_prices = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(feature_prices)


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


def test_rounds_are_paired_with_the_naive_servers_round():
    def run(rps, latencies, errors=0):
        return {"concurrency": 1, "requests": len(latencies), "throughput_rps": rps, "errors": errors,
                "latencies_ms": latencies, **bench._stats(np.array(latencies))}

    mine = [run(100, [1.0, 2.0]), run(300, [3.0], errors=1), run(200, [4.0, 5.0], errors=2)]
    naive = [run(100, [1.0]), run(100, [1.0]), run(400, [1.0])]
    got = bench.paired(mine, naive)
    assert got["x_naive_rounds"] == [1.0, 3.0, 0.5] and got["x_naive"] == 1.0  # the median ratio, not 200 / 100
    assert got["throughput_rps"] == 200 and got["p50_ms"] == 3.0  # latencies: all rounds' requests together
    assert got["errors"] == 3 and got["requests"] == 5 and got["rounds"] == 3 and got["rounds_rps"] == [100, 300, 200]
    assert "latencies_ms" not in got


def test_bench_against_the_naive_server(smoke_bundle, data_root, tmp_path):
    """`--naive --workers 2`: the naive server of the static twin (uvicorn's two worker processes),
    instanas-serve on it and on the bundle (INSTANAS_WORKERS=2), each level on each; the naive
    server (one process) answers what instanas-serve answers for the same bundle."""
    out = tmp_path / "bench.json"
    done = run_cli("instanas-bench", "--model", str(smoke_bundle), "--data", str(data_root / "test.tar.gz"),
                   "--images", "10", "--requests", "30", "--concurrency", "1,4", "--naive", "--workers", "2",
                   "--rounds", "2", "--no-in-process", "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(out.read_text())["workers"] == 2 and "HTTP, 2 processes each" in done.stdout
    compared = json.loads(out.read_text())["against_naive"]
    assert list(compared) == ["naive", "instanas_static", "instanas"]
    for results in compared.values():
        assert [r["concurrency"] for r in results] == [1, 4]
        assert all(r["errors"] == 0 and r["requests"] == 60 and r["throughput_rps"] > 0 for r in results)
        assert all(r["rounds"] == 2 and len(r["rounds_rps"]) == 2 and r["throughput_rps"] == statistics.median(r["rounds_rps"])
                   and r["x_naive"] == statistics.median(r["x_naive_rounds"]) for r in results)
    assert all(r["x_naive_rounds"] == [1.0, 1.0] for r in compared["naive"])
    assert "x naive" in done.stdout and "2 rounds" in done.stdout

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


def _jpegs(archive, n: int) -> list[bytes]:
    with tarfile.open(archive) as tar:
        return [tar.extractfile(m).read() for m in itertools.islice((m for m in tar if m.isfile()
                                                                      and m.name.endswith(".jpg")), n)]


def test_each_feature_price_variant_takes_its_feature_out(smoke_bundle, data_root):
    """scripts/feature_prices.py starts instanas-serve with one feature taken out: each variant
    serves, and lacks exactly what it says (a body over the limit is refused with limits and
    served without; the rest of the server still works)."""
    static = smoke_bundle.parent / "bundle-mobilenet_v2"
    script = [sys.executable, str(ROOT / "scripts" / "feature_prices.py"), "--serve"]
    small_limit = {"INSTANAS_MAX_BODY_BYTES": "200"}  # below every test JPEG: refused unless the limits are out
    servers = {patch: bench._Server(static, small_limit if patch == "no-limits" else {}, command=[*script, patch])
               for patch in feature_prices.PATCHES}
    servers["defaults"] = bench._Server(static, small_limit)
    first, second = _jpegs(data_root / "test.tar.gz", 2)
    try:
        def classify(name: str, jpeg: bytes) -> httpx.Response:
            return httpx.post(servers[name].url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"})

        def requests_counted(name: str) -> float:
            return sample(httpx.get(servers[name].url + "/metrics").text, "instanas_requests_total", endpoint="/classify")

        assert classify("defaults", first).status_code == 413 and classify("no-limits", first).status_code == 200
        for patch in ("no-metrics", "plain-response", "no-decode", "executor-decode"):
            assert classify(patch, first).status_code == 200
        assert requests_counted("no-metrics") == 0 and requests_counted("no-limits") == 1
        plain = classify("plain-response", second).json()
        assert set(plain) == {"label", "probability"} and requests_counted("plain-response") == 2
        one, other = classify("no-decode", second).json(), classify("no-decode", first).json()
        assert one["prediction"] == other["prediction"] and one["top_k"] == other["top_k"]  # the first image's input
        assert one["latency_ms"]["decode"] >= 0 and requests_counted("no-decode") == 3
    finally:
        for server in servers.values():
            server.stop()


_profile_spec = importlib.util.spec_from_file_location("profile_request_path",
                                                       ROOT / "scripts" / "profile_request_path.py")
profile_request_path = importlib.util.module_from_spec(_profile_spec)
_profile_spec.loader.exec_module(profile_request_path)


def test_profile_samples_fall_in_the_part_of_their_innermost_frame():
    """scripts/profile_request_path.py: numpy and the interpreter count for whatever called them, the
    connection guard for HTTP, a thread blocked on a lock for waiting."""
    part = profile_request_path.part_of
    loop = ["_run_module_as_main (<frozen runpy>:198)", "Runner.run (asyncio/runners.py:118)",
            "RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:409)",
            "_AnswerWhenStopping.__call__ (service/server.py:371)", "Envelope.__call__ (service/envelope.py:90)",
            "answer (service/routes/classify.py:97)", "process (service/classification.py:190)"]
    assert part(loop + ["prepare (service/classification.py:150)", "to_input (service/imaging.py:230)",
                        "_mean (numpy/_core/_methods.py:118)", "PyArray_Mean (_multiarray_umath.so)"]) == "decode"
    assert part(loop + ["run_batch (service/executor.py:140)", "softmax (service/executor.py:56)",
                        "_amax (numpy/_core/_methods.py:44)"]) == "request path"
    assert part(loop + ["FusedGraph.__call__ (service/fused.py:177)",
                        "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:275)",
                        "MlasConvDepthwise (libonnxruntime.so)"]) == "onnxruntime"
    assert part(loop[:4] + ["AccessLog.write (service/logs.py:190)", "Logger.handle (logging/__init__.py:1644)",
                            "write (libc.so.6)"]) == "access log"
    assert part(loop[:3] + ["Guard.on_header (service/server.py:285)"]) == "HTTP and event loop"
    assert part(["Thread.run (threading.py:982)", "_worker (concurrent/futures/thread.py:83)",
                 "_queue_SimpleQueue_get", "PyThread_acquire_lock_timed"]) == "waiting"
    assert part(["thread_run", "0x7f0012"]) == "other"


def test_the_profile_of_a_real_server_under_load(smoke_bundle, data_root, tmp_path):
    """py-spy records a real instanas-serve while it serves: every level gets samples, the graphs'
    among them where a lone request runs them on the loop (the smoke model's graphs at batch 8 are
    too short for a sample to land in them reliably), and the table lists every part."""
    static = smoke_bundle.parent / "bundle-mobilenet_v2"
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_request_path.py"), "--model", str(static),
                           "--data", str(data_root / "test.tar.gz"), "--concurrency", "1,8", "--requests", "400",
                           "--rate", "200", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for part in profile_request_path.ORDER:
        assert f"| {part} |" in table
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 8]
    assert levels[0]["samples"].get("onnxruntime", 0) > 0
    for level in levels:
        assert level["errors"] == 0 and sum(n for part, n in level["samples"].items() if part != "waiting") > 0
        assert abs(sum(level["share_of_busy"].values()) - 1) < 1e-9


def test_the_profile_of_the_interpreters_lock(smoke_bundle, data_root, tmp_path):
    """--gil: only the thread holding the interpreter's lock is sampled, so the loop's HTTP work and the
    request path are seen and a thread blocked on a lock is not."""
    static = smoke_bundle.parent / "bundle-mobilenet_v2"
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_request_path.py"), "--model", str(static),
                           "--data", str(data_root / "test.tar.gz"), "--concurrency", "8", "--requests", "400",
                           "--gil", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    profile = json.loads(out.read_text())
    assert profile["gil"] is True and profile["rate"] == 200
    (level,) = profile["levels"]
    assert level["errors"] == 0
    assert level["samples"].get("HTTP and event loop", 0) > 0 and level["samples"].get("request path", 0) > 0
    assert level["samples"].get("waiting", 0) == 0
