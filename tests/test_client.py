"""`instanas-classify`, the command-line client, against a real server: its table and JSON, the
options it passes on, and its messages and exit codes when things go wrong."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from service import client
from tests.conftest import Server, free_port, run_cli
from tests.helpers import export_test_bundle
from training.searchspace import build_tiny_space


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = tmp_path_factory.mktemp("client-bundle")
    export_test_bundle(bundle, build_tiny_space(), seed=3)
    srv = Server(bundle, bundle.parent / "client-server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def files(test_jpegs, tmp_path_factory) -> list:
    """A JPEG and a PNG on disk."""
    folder = tmp_path_factory.mktemp("client-files")
    jpeg, png = folder / "cat.jpg", folder / "ship.png"
    jpeg.write_bytes(test_jpegs[6][1])
    out = io.BytesIO()
    Image.open(io.BytesIO(test_jpegs[16][1])).save(out, "PNG")
    png.write_bytes(out.getvalue())
    return [jpeg, png]


def classify(server, path, **params) -> dict:
    return httpx.post(server.url + "/classify", content=path.read_bytes(), params=params,
                      headers={"content-type": "application/octet-stream"}).json()


def test_table(server, files):
    done = run_cli("instanas-classify", *map(str, files), "--url", server.url)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:4] == ["file", "label", "probability", "architecture"] and "operating point" in header
    assert len(rows) == 2
    for path, row in zip(files, rows):
        expected = classify(server, path)
        cells = row.split()
        assert cells[0] == str(path) and cells[1] == expected["prediction"]["label"]
        assert cells[2] == f"{expected['prediction']['probability']:.4f}" and cells[3] == expected["architecture"]["code"]
        assert cells[4] == expected["operating_point"]["name"] and cells[5] == "(default)"
        assert cells[6] == f"{expected['architecture']['estimated_latency_ms']:.3f}"
        assert float(cells[7]) > 0  # the server's measured time


def test_json_and_options(server, files):
    done = run_cli("instanas-classify", *map(str, files), "--url", server.url + "/", "--json", "--top-k", "3",
                   "--architecture", "mobilenet_v2")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["file"] for r in records] == [str(p) for p in files]
    for path, record in zip(files, records):
        expected = classify(server, path, top_k=3, architecture="mobilenet_v2")
        assert record["top_k"] == expected["top_k"] and len(record["top_k"]) == 3
        assert record["architecture"]["code"] == "1111" and record["operating_point"]["reason"] == "architecture"
    table = run_cli("instanas-classify", str(files[0]), "--url", server.url, "--top-k", "2",
                    "--operating-point", "default")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]
    assert len(rows) == 2 and "default (requested)" in rows[0]  # the second class on a line of its own
    assert rows[1].split()[0] == classify(server, files[0], top_k=2)["top_k"][1]["label"]


def test_a_refused_image_is_reported_and_the_rest_still_classified(server, files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(files[0].read_bytes()[:200])
    done = run_cli("instanas-classify", str(broken), str(files[1]), "--url", server.url)
    assert done.returncode == client.EXIT_REFUSED
    assert f"{broken}: the server refused it: 400 corrupt_image: the image could not be decoded" in done.stderr
    assert str(files[1]) in done.stdout and str(broken) not in done.stdout
    as_json = run_cli("instanas-classify", str(broken), "--url", server.url, "--json")
    assert as_json.returncode == client.EXIT_REFUSED
    assert json.loads(as_json.stdout)[0]["error"]["code"] == "corrupt_image"
    options = run_cli("instanas-classify", str(files[0]), "--url", server.url, "--operating-point", "Z")
    assert options.returncode == client.EXIT_REFUSED
    assert "422 unknown_operating_point: operating point 'Z' is not in this bundle" in options.stderr


def test_server_down_and_bad_usage(files, tmp_path):
    down = run_cli("instanas-classify", str(files[0]), "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == client.EXIT_UNREACHABLE and "cannot reach the server at http://127.0.0.1:" in down.stderr
    missing = run_cli("instanas-classify", str(tmp_path / "nope.jpg"), "--url", "http://127.0.0.1:1")
    assert missing.returncode == client.EXIT_USAGE and "cannot read" in missing.stderr and "nope.jpg" in missing.stderr
    for args in (["--top-k", "0"], ["--url", "ftp://x"], []):
        bad = run_cli("instanas-classify", *([str(files[0])] if args else []), *args)
        assert bad.returncode == client.EXIT_USAGE, (args, bad.stderr)


def test_a_cascade_answer_shows_the_resolution_that_answered():
    from service.client import table

    def response(network, resolution):
        return {"architecture": {"code": "1111", "network": network, "resolution": resolution,
                                 "estimated_latency_ms": 0.3}, "top_k": [{"label": "cat", "probability": 0.9}],
                "operating_point": {"name": "fast", "reason": "default"}, "latency_ms": {"total": 1.0}}

    rows = table([("a.jpg", response("mobilenet_v2@16", 16)), ("b.jpg", response(None, 32))]).splitlines()[1:]
    assert rows[0].split()[3] == "1111@16" and rows[1].split()[3] == "1111"
