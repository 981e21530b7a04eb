"""The real Prometheus scrapes the real service, with the committed docker/prometheus.yml.

Only the scrape target (api:8000 does not resolve outside compose) and the interval (to keep
the test short) are replaced; everything else is the file that ships (the `prometheus` fixture
in tests/conftest.py, which tests/test_grafana.py uses too).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import PROMETHEUS_WAIT_S as WAIT_S
from tests.conftest import prometheus_values, service_values, wait_for_target_up

pytestmark = pytest.mark.slow


def test_prometheus_scrapes_the_service(server, prometheus, test_jpegs):
    url, job = prometheus
    up = f'up{{job="{job}"}}'

    # Wait for the first scrape, so the counters are seen both before and after the requests.
    wait_for_target_up(server, url, job)

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
