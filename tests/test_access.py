"""Optional access control (service/security.py): INSTANAS_API_TOKEN guards /model, /metrics and
/admin/*; CORS is off unless INSTANAS_CORS_ORIGINS lists origins; the Prometheus configs can send
the token (their commented examples, uncommented here, work with a real Prometheus and pass the
PodMonitor CRD's schema)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from tests import hostile as h
from tests.conftest import ROOT, Server, free_port, local_prometheus_config, prometheus_values

TOKEN = "s3cret-token"


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kw)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def guarded(tiny_bundle):
    return create_app(Settings(model=tiny_bundle, api_token=TOKEN))


@pytest.fixture(scope="module")
def open_app(tiny_bundle):
    return create_app(Settings(model=tiny_bundle))


@pytest.mark.parametrize("method, path", [("GET", "/model"), ("GET", "/metrics"), ("POST", "/admin/reload")])
def test_operator_endpoints_need_the_token(guarded, method, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                    {"authorization": TOKEN}):
        r = call(guarded, method, path, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == 'Bearer realm="instanas"'
    ok = call(guarded, method, path, headers={"authorization": f"Bearer {TOKEN}"},
              **({"json": {"path": "/nonexistent"}} if method == "POST" else {}))
    assert ok.status_code == (422 if method == "POST" else 200), ok.text  # past the guard


def test_the_rest_stays_open(guarded):
    assert call(guarded, "GET", "/healthz/live").status_code == 200
    assert call(guarded, "GET", "/openapi.json").status_code == 200
    r = call(guarded, "POST", "/classify", content=h.jpeg(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_without_a_token_nothing_is_checked(open_app):
    assert call(open_app, "GET", "/model").status_code == 200
    assert call(open_app, "GET", "/metrics").status_code == 200


def test_cors_is_off_by_default(open_app):
    r = call(open_app, "GET", "/healthz/live", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    preflight = call(open_app, "OPTIONS", "/classify", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


def test_cors_allows_the_configured_origins_only(tiny_bundle):
    app = create_app(Settings(model=tiny_bundle, cors_origins="https://a.example, https://b.example"))
    preflight = call(app, "OPTIONS", "/classify", headers={
        "origin": "https://b.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://b.example"
    r = call(app, "GET", "/healthz/live", headers={"origin": "https://a.example"})
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    other = call(app, "GET", "/healthz/live", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # a classification from a browser goes through CORS too (not the envelope's fast path)
    classified = call(app, "POST", "/classify", content=h.jpeg(),
                      headers={"origin": "https://a.example", "content-type": "image/jpeg"})
    assert classified.status_code == 200, classified.text
    assert classified.headers["access-control-allow-origin"] == "https://a.example"
    assert "x-request-id" in classified.headers["access-control-expose-headers"].lower()


# --- Prometheus can send the token ----------------------------------------------------------------------


def commented_block(text: str, first: str):
    """The YAML block starting `# <first>` that a file carries commented out, uncommented and parsed."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"\s*# {re.escape(first)}", line))
    indent = lines[start].index("#")
    block = [lines[start][indent + 2:]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * indent + "#   "):
            break
        block.append(line[indent + 2:])
    return yaml.safe_load("\n".join(block))


def test_the_podmonitor_example_passes_the_crd_schema():
    from tests.test_deploy import KUBERNETES_VERSIONS, check

    path = ROOT / "deploy" / "kubernetes" / "podmonitor.yaml"
    doc = yaml.safe_load(path.read_text())
    auth = commented_block(path.read_text(), "authorization:")
    assert auth["authorization"]["type"] == "Bearer"
    doc["spec"]["podMetricsEndpoints"][0].update(auth)
    for version in KUBERNETES_VERSIONS:
        check(doc, version)
    deployment = (ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text()
    env = commented_block(deployment, "- name: INSTANAS_API_TOKEN")
    secret = env[0]["valueFrom"]["secretKeyRef"]
    assert secret == auth["authorization"]["credentials"]  # the same Secret and key


@pytest.mark.slow
def test_prometheus_scrapes_a_guarded_server_with_the_documented_config(tiny_bundle, tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: run scripts/test-setup.sh (Debian package prometheus)"
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_API_TOKEN=TOKEN)
    processes = []
    try:
        (tmp_path / "token").write_text(TOKEN + "\n")
        auth = commented_block((ROOT / "docker" / "prometheus.yml").read_text(), "authorization:")
        auth["authorization"]["credentials_file"] = str(tmp_path / "token")
        urls = {}
        for name, extra in (("with", auth), ("without", {})):
            config, job = local_prometheus_config(f"127.0.0.1:{srv.port}")
            config["scrape_configs"][0].update(extra)
            folder = tmp_path / name
            folder.mkdir()
            (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
            port = free_port()
            processes.append(subprocess.Popen(
                [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls[name] = (f"http://127.0.0.1:{port}", job)
        deadline = time.time() + 60
        results = {}
        while time.time() < deadline and len(results) < 2:
            for name, (url, job) in urls.items():
                try:
                    up = prometheus_values(url, f'up{{job="{job}"}}', ("instance",))
                except (httpx.HTTPError, AssertionError, KeyError, ValueError):  # not up yet
                    continue
                if up:
                    results[name] = next(iter(up.values()))
            time.sleep(0.5)
        assert results == {"with": 1.0, "without": 0.0}, results
    finally:
        for p in processes:
            p.terminate()
            p.wait(10)
        srv.stop()
