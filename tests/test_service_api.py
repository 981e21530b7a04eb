"""Real HTTP against a real `instanas-serve` process on a smoke-trained bundle."""

from __future__ import annotations

import io
import json

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service import architecture
from service.manifest import Manifest
from service.schemas import ClassifyResponse, ErrorResponse
from tests.conftest import metric


def executions(url: str) -> dict[tuple[int, int], float]:
    """instanas_module_executions_total by (cell, module), for the one model served."""
    text = httpx.get(url + "/metrics").text
    return {(int(s.labels["cell"]), int(s.labels["module"])): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "instanas_module_executions_total"}


def post_jpeg(url: str, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
    return httpx.post(url + "/classify", content=data, headers={"content-type": content_type}, params=params)


@pytest.fixture(scope="module")
def manifest(smoke_bundle) -> Manifest:
    return Manifest.model_validate_json((smoke_bundle / "manifest.json").read_text())


def test_classify_real_jpegs_round_trip(server, test_jpegs, manifest):
    schema = ClassifyResponse.model_json_schema()
    space = manifest.search_space
    for _, data in test_jpegs:
        response = post_jpeg(server.url, data)
        assert response.status_code == 200, response.text
        body = response.json()
        jsonschema.validate(body, schema)
        assert body["prediction"] == body["top_k"][0]
        assert len(body["top_k"]) == 5
        probs = [s["probability"] for s in body["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert body["prediction"]["label"] == manifest.classes[body["prediction"]["index"]]
        arch = body["architecture"]
        matrix = architecture.decode(arch["code"], space.num_cells, space.num_modules)
        assert [[space.cells[c].modules[m].name for m in np.flatnonzero(row)] for c, row in enumerate(matrix)] == \
            [cell["modules"] for cell in arch["cells"]]
        assert arch["modules_executed"] == int(matrix.sum())
        # what ran obeys the empty-cell rule
        assert np.array_equal(architecture.apply_empty_cell_rule(matrix[None], space)[0], matrix)
        latency = body["latency_ms"]
        assert latency["total"] >= latency["controller"] + latency["backbone"]
        assert body["model"]["name"] == manifest.name


@pytest.fixture(scope="module")
def varied_server(tmp_path_factory):
    """A server on a bundle whose controller picks different architectures for different images."""
    from tests.conftest import Server
    from tests.helpers import export_test_bundle
    from training.searchspace import build_tiny_space

    bundle = tmp_path_factory.mktemp("varied")
    _, _, manifest = export_test_bundle(bundle, build_tiny_space(), seed=3)
    srv = Server(bundle, bundle.parent / "varied-server.log")
    yield srv, manifest
    srv.stop()


def test_execution_counters_move_exactly_as_responses_say(varied_server, test_jpegs):
    server, manifest = varied_server
    space = manifest.search_space
    before = executions(server.url)
    expected = np.zeros((space.num_cells, space.num_modules))
    codes = set()
    for _, data in test_jpegs:
        body = post_jpeg(server.url, data).json()
        codes.add(body["architecture"]["code"])
        expected += architecture.decode(body["architecture"]["code"], space.num_cells, space.num_modules)
    assert len(codes) > 1 and 0 < expected.sum() < len(test_jpegs) * expected.size  # really per image
    after = executions(server.url)
    assert set(after) == {(c, m) for c in range(space.num_cells) for m in range(space.num_modules)}
    moved = np.zeros_like(expected)
    for (c, m), value in after.items():
        moved[c, m] = value - before.get((c, m), 0.0)
    assert np.array_equal(moved, expected)


def test_top_k_ranks_highest_first_and_equals_in_class_order():
    """As a stable argsort of the negated probabilities, ties and all."""
    from service.classification import ranked

    rng = np.random.default_rng(0)
    for _ in range(500):
        probabilities = rng.choice([0.0, 0.1, 0.25, 0.5], size=10).astype(np.float32)
        for k in (1, 3, 10):
            assert ranked(probabilities.tolist(), k) == np.argsort(-probabilities, kind="stable")[:k].tolist()


def test_multipart_png_and_top_k(server, test_jpegs):
    image = Image.open(io.BytesIO(test_jpegs[0][1]))
    png = io.BytesIO()
    image.resize((64, 48)).save(png, "PNG")  # another size and format: resized by the server
    response = httpx.post(server.url + "/classify", files={"file": ("x.png", png.getvalue(), "image/png")},
                          params={"top_k": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["top_k"]) == 3


def test_same_image_same_answer_by_any_route(server, test_jpegs):
    data = test_jpegs[3][1]
    raw = post_jpeg(server.url, data).json()
    multipart = httpx.post(server.url + "/classify", files={"file": ("a.jpg", data, "image/jpeg")}).json()
    octet = post_jpeg(server.url, data, "application/octet-stream").json()
    for other in (multipart, octet):
        assert other["top_k"] == raw["top_k"] and other["architecture"] == raw["architecture"]


BAD_INPUTS = {
    "empty body": (b"", "image/jpeg", 400, "empty_body"),
    "not an image": (b"definitely not an image" * 10, "image/jpeg", 400, "not_an_image"),
    "unsupported content type": (b"{}", "text/plain", 415, "unsupported_media_type"),
    "no content type": (b"abc", "", 415, "unsupported_media_type"),
    "multipart without file": (b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--b--\r\n",
                               "multipart/form-data; boundary=b", 400, "missing_file"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS) + ["truncated jpeg", "top_k too large", "top_k zero"])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_answering(server, test_jpegs, name):
    jpeg = test_jpegs[0][1]
    params = {}
    if name == "truncated jpeg":
        data, ctype, status, code = jpeg[: len(jpeg) // 2], "image/jpeg", 400, "corrupt_image"
    elif name == "top_k too large":
        data, ctype, status, code, params = jpeg, "image/jpeg", 422, "invalid_request", {"top_k": 11}
    elif name == "top_k zero":
        data, ctype, status, code, params = jpeg, "image/jpeg", 422, "invalid_request", {"top_k": 0}
    else:
        data, ctype, status, code = BAD_INPUTS[name]
    rejected_before = metric(server.url, "instanas_rejections_total", reason=code)
    response = post_jpeg(server.url, data, ctype, **params)
    assert response.status_code == status, response.text
    body = response.json()
    ErrorResponse.model_validate(body)
    assert body["error"]["code"] == code and body["error"]["message"]
    assert metric(server.url, "instanas_rejections_total", reason=code) == rejected_before + 1
    # and the server still serves
    assert httpx.get(server.url + "/healthz/ready").status_code == 200
    assert post_jpeg(server.url, jpeg).status_code == 200


def test_too_large_body_is_413(smoke_bundle, tmp_path, test_jpegs):
    from tests.conftest import Server

    srv = Server(smoke_bundle, tmp_path / "log", INSTANAS_MAX_BODY_BYTES="1000")
    try:
        response = post_jpeg(srv.url, b"\xff" * 5000)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        small = min((data for _, data in test_jpegs), key=len)
        assert len(small) <= 1000 and post_jpeg(srv.url, small).status_code == 200  # under the limit: served
        # refused before its body arrived: the answer closes the connection, nothing more is read
        import socket

        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
            conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 20000000\r\n\r\n" + b"x" * 500)
            answer = b""
            while chunk := conn.recv(65536):  # ends when the server closes
                answer += chunk
        head = answer.split(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 413") and "connection: close" in head, head
    finally:
        srv.stop()


def test_health_model_metrics_and_openapi(server, manifest):
    assert httpx.get(server.url + "/healthz/live").json() == {"status": "ok", "model": None}
    ready = httpx.get(server.url + "/healthz/ready").json()
    assert ready["status"] == "ready" and ready["model"]["name"] == manifest.name
    model = httpx.get(server.url + "/model").json()
    assert model["classes"] == manifest.classes and len(model["blocks"]) == len(manifest.blocks)
    text = httpx.get(server.url + "/metrics").text
    for name in ("instanas_requests_total", "instanas_request_duration_seconds_bucket", "instanas_stage_duration_seconds_bucket",
                 "instanas_architecture_estimated_latency_seconds_bucket", "instanas_architecture_mflops_bucket",
                 "instanas_batch_size_bucket", "instanas_in_flight_requests", "instanas_queue_depth", "instanas_model_info"):
        assert name in text
    openapi = httpx.get(server.url + "/openapi.json").json()
    assert "/classify" in openapi["paths"]
    assert "image/jpeg" in openapi["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert httpx.get(server.url + "/docs").status_code == 200
    unknown = httpx.get(server.url + "/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert json.loads(httpx.get(server.url + "/model").text)["sha256"] == ready["model"]["sha256"]
