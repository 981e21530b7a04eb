"""Shared fixtures: the real CIFAR-10 JPEGs, a smoke-trained bundle, a real server process."""

from __future__ import annotations

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


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


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


class Server:
    """A real `instanas-serve` process on a loopback port."""

    def __init__(self, bundle: Path, log: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(
            [str(BIN / "instanas-serve"), "--model", str(bundle), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **env})
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

    def stop(self) -> None:
        if self.process.poll() is None:
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


@pytest.fixture
def bundle_copy(smoke_bundle, tmp_path) -> Path:
    """A private copy of the smoke bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, dst)
    return dst
