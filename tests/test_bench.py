"""`instanas-bench` end to end on the smoke bundle, small: every figure it promises is there."""

from __future__ import annotations

import json

from tests.conftest import run_cli


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
