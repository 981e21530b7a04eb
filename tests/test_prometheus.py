"""The real Prometheus scrapes the real service, with the committed docker/prometheus.yml.

Only the scrape target (api:8000 does not resolve outside compose) and the interval (to keep
the test short) are replaced; everything else is the file that ships.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
WAIT_S = 30


def local_config(target: str) -> tuple[dict, str]:
    """docker/prometheus.yml with the api job pointed at `target`; also returns the job name."""
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"]
             if any("api:8000" in sc["targets"] for sc in j["static_configs"])]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = "1s"
    return config, job["job_name"]


@pytest.fixture
def prometheus(server, tmp_path):
    """A real `prometheus` on a free loopback port, scraping `server`: (base url, job name)."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: run scripts/test-setup.sh (Debian package prometheus)"
    config, job = local_config(f"127.0.0.1:{server.port}")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + WAIT_S
            while not _ready(url):
                assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
                assert time.time() < deadline, f"prometheus not ready:\n{log_path.read_text()}"
                time.sleep(0.2)
            yield url, job
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def service_values(server, name: str, labels: tuple[str, ...]) -> dict[tuple, float]:
    """One metric from the service's own /metrics, by label values."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return {tuple(s.labels[k] for k in labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def prometheus_values(url: str, query: str, labels: tuple[str, ...]) -> dict[tuple, float]:
    """An instant query through Prometheus's HTTP API, by label values."""
    body = httpx.get(url + "/api/v1/query", params={"query": query}, timeout=5).json()
    assert body["status"] == "success", body
    return {tuple(r["metric"][k] for k in labels): float(r["value"][1]) for r in body["data"]["result"]}


def test_prometheus_scrapes_the_service(server, prometheus, test_jpegs):
    url, job = prometheus
    up = f'up{{job="{job}"}}'

    # Wait for the first scrape, so the counters are seen both before and after the requests.
    deadline = time.time() + WAIT_S
    while prometheus_values(url, up, ("instance",)) != {(f"127.0.0.1:{server.port}",): 1.0}:
        assert time.time() < deadline, f"target never up: {prometheus_values(url, up, ('instance',))}"
        time.sleep(0.5)

    modules = ("cell", "module")
    before = service_values(server, "instanas_module_executions_total", modules)
    executed = 0
    for _label, jpeg in test_jpegs[:5]:
        response = httpx.post(server.url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
        assert response.status_code == 200, response.text
        executed += response.json()["architecture"]["modules_executed"]

    # The scrapes themselves count as /metrics requests, so that series never settles: leave it out.
    requests = ("endpoint", "status")
    query = f'instanas_requests_total{{job="{job}", endpoint!="/metrics"}}'
    want_requests = {k: v for k, v in service_values(server, "instanas_requests_total", requests).items()
                     if k[0] != "/metrics"}
    want_modules = service_values(server, "instanas_module_executions_total", modules)
    assert sum(want_modules.values()) - sum(before.values()) == executed
    assert want_requests[("/classify", "200")] >= 5

    deadline = time.time() + WAIT_S
    while True:
        got_requests = prometheus_values(url, query, requests)
        got_modules = prometheus_values(url, f'instanas_module_executions_total{{job="{job}"}}', modules)
        if (got_requests, got_modules) == (want_requests, want_modules) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert got_requests == want_requests
    assert got_modules == want_modules
    assert prometheus_values(url, f'instanas_requests_total{{job="{job}", endpoint="/metrics"}}', requests)
    assert prometheus_values(url, up, ("instance",)) == {(f"127.0.0.1:{server.port}",): 1.0}
