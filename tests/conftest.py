"""Shared fixtures: the real CIFAR-10 JPEGs, a smoke-trained bundle, a real server process, a real Prometheus."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import sample

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("INSTANAS_DATA", ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "test.tar.gz").exists():
        pytest.fail(f"CIFAR-10 JPEGs not found at {DATA} (set INSTANAS_DATA)")
    return DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Decoded-data cache for this test session (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["INSTANAS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def test_jpegs(data_root, tmp_path_factory) -> list[tuple[str, bytes]]:
    """20 real test JPEGs, two a class: (class name, bytes)."""
    out = []
    with tarfile.open(data_root / "test.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[2] in ("0000.jpg", "0001.jpg"):
                out.append((parts[1], tar.extractfile(member).read()))
    assert len(out) == 20
    return sorted(out)


def run_cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """One of the project's commands, to its end; `env`: variables set for it."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


@pytest.fixture(scope="session")
def smoke_run(data_root, cache_dir, tmp_path_factory) -> Path:
    """A real `instanas-train all --config smoke` run on real CIFAR-10 JPEGs, exported."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    done = run_cli("instanas-train", "all", "--config", "smoke", "--data", str(data_root), "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def smoke_bundle(smoke_run) -> Path:
    return smoke_run / "bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout: float = 60) -> None:
    """Poll `check()` until it is true. The timeout only turns a hang into a failure: it is far longer
    than anything awaited this way takes, on any machine."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Server:
    """A real `instanas-serve` process on a loopback port."""

    def __init__(self, bundle: Path, log: Path, preexec_fn=None, gated: bool = False, **env: str):
        """`env`: INSTANAS_* settings; the drain on SIGTERM is off unless set (INSTANAS_DRAIN_SECONDS), and so
        is the load governor (INSTANAS_QUEUE_TARGET_MS), so that which operating point answers does not
        depend on how busy the test machine is.
        `preexec_fn`: run in the child before it starts (e.g. to lower its open-files limit).
        `gated`: the server of tests/gated_server.py, whose batches `hold()` and `release()` stop and start
        (batches never run on the event loop's thread there)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.gated = gated
        self._log_file = open(log, "w")
        command = [str(BIN / "python"), "-m", "tests.gated_server"] if gated else [str(BIN / "instanas-serve")]
        self.process = subprocess.Popen(
            [*command, "--model", str(bundle), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log_file, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
            cwd=ROOT if gated else None,  # `python -m tests...` from the checkout
            env={**os.environ, "INSTANAS_DRAIN_SECONDS": "0", "INSTANAS_QUEUE_TARGET_MS": "0", **env})
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready:\n{log.read_text()}")

    def hold(self) -> None:
        """From now on every batch waits before it runs (a gated server only)."""
        httpx.post(self.url + "/test/hold", timeout=10).raise_for_status()

    def release(self) -> None:
        """Let every held batch, and later ones, run."""
        httpx.post(self.url + "/test/release", timeout=10).raise_for_status()

    def queued(self) -> tuple[float, float]:
        """(classifications being executed or held at the gate, classifications waiting for an executor)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sample(text, "instanas_in_flight_requests"), sample(text, "instanas_queue_depth")

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.gated:  # a batch still held would hold up the shutdown
                with contextlib.suppress(httpx.HTTPError):
                    self.release()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log_file.close()


@pytest.fixture(scope="session")
def server(smoke_bundle, tmp_path_factory):
    srv = Server(smoke_bundle, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny-space bundle with two operating points (A, the default, and B), random weights:
    seconds to export, for tests of the server rather than of the model."""
    from tests.helpers import export_test_bundle, random_controller
    from training.searchspace import build_tiny_space

    space = build_tiny_space()
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    export_test_bundle(out, space, controllers={"A": random_controller(space, 1), "B": random_controller(space, 2)})
    data = json.loads((out / "manifest.json").read_text())
    data["default_controller"] = "A"
    (out / "manifest.json").write_text(json.dumps(data))
    return out


@pytest.fixture
def bundle_copy(smoke_bundle, tmp_path) -> Path:
    """A private copy of the smoke bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, dst)
    return dst


# --- A real Prometheus scraping the real server (tests/test_prometheus.py, tests/test_grafana.py) ---

PROMETHEUS_WAIT_S = 30


def local_prometheus_config(target: str) -> tuple[dict, str]:
    """docker/prometheus.yml with the api job pointed at `target`; also returns the job name.

    Only the scrape target (api:8000 does not resolve outside compose) and the interval (to keep the
    tests short) are replaced; everything else is the file that ships.
    """
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"]
             if any("api:8000" in sc["targets"] for sc in j["static_configs"])]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = "1s"
    return config, job["job_name"]


def _prometheus_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A real `prometheus` on a free loopback port, scraping `server`: (base url, job name).

    One per test module, so a module's tests may share the traffic they sent and its scrapes.
    """
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: run scripts/test-setup.sh (Debian package prometheus)"
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config, job = local_prometheus_config(f"127.0.0.1:{server.port}")
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
            deadline = time.time() + PROMETHEUS_WAIT_S
            while not _prometheus_ready(url):
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


def metric(url: str, name: str, /, **labels: str) -> float:
    """A sample of the service's /metrics at `url` (a counter's `..._total`, a histogram's `..._count`),
    summed over the series whose labels include `labels` (e.g. every model's); 0 when there is none."""
    return sample(httpx.get(url + "/metrics", timeout=10).text, name, **labels)


def service_values(server, name: str, labels: tuple[str, ...]) -> dict[tuple, float]:
    """One metric from the service's own /metrics, by label values."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return {tuple(s.labels[k] for k in labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def prometheus_query(url: str, query: str) -> list[dict]:
    """An instant query through Prometheus's HTTP API: its vector result."""
    body = httpx.get(url + "/api/v1/query", params={"query": query}, timeout=5).json()
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body
    return body["data"]["result"]


def prometheus_values(url: str, query: str, labels: tuple[str, ...]) -> dict[tuple, float]:
    """An instant query through Prometheus's HTTP API, by label values."""
    return {tuple(r["metric"][k] for k in labels): float(r["value"][1]) for r in prometheus_query(url, query)}


def wait_for_target_up(server, url: str, job: str) -> None:
    """Until Prometheus has scraped `server` at least once."""
    up = f'up{{job="{job}"}}'
    deadline = time.time() + PROMETHEUS_WAIT_S
    while prometheus_values(url, up, ("instance",)) != {(f"127.0.0.1:{server.port}",): 1.0}:
        assert time.time() < deadline, f"target never up: {prometheus_values(url, up, ('instance',))}"
        time.sleep(0.5)
