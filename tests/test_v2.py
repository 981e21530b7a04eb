"""The Open Inference Protocol (KServe v2) endpoints, driven by NVIDIA's unmodified tritonclient[http]
against a real server process: the same answers as /classify, in binary and JSON tensors, encoded
images and FP32 inputs; the protocol's errors."""

from __future__ import annotations

import base64
import json
import struct
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service import imaging
from service.manifest import Evaluation, Manifest
from tests.conftest import Server, metric
from tests.helpers import export_test_bundle, random_controller
from training.searchspace import build_tiny_space

OUTPUTS = ["probabilities", "label", "index", "architecture", "operating_point", "estimated_latency_ms", "resolution",
           "escalated"]
CHUNK = 25  # images per infer request (the server's default limit is 32)


@pytest.fixture(scope="module")
def hundred_jpegs(data_root) -> list[bytes]:
    """100 real CIFAR-10 test JPEGs, ten a class, in a fixed order."""
    out = []
    with tarfile.open(data_root / "test.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[2] in {f"{i:04d}.jpg" for i in range(10)}:
                out.append((member.name, tar.extractfile(member).read()))
    assert len(out) == 100
    return [data for _, data in sorted(out)]


@pytest.fixture(scope="module")
def v2_server(tmp_path_factory):
    """A bundle of three operating points (B the default) whose controllers pick different
    architectures for different images, served by a real process."""
    space = build_tiny_space()
    out = tmp_path_factory.mktemp("v2-bundle")
    controllers = {"A": random_controller(space, 1, bias=2.0), "B": random_controller(space, 2),
                   "C": random_controller(space, 3, bias=-2.0)}
    evaluations = {name: Evaluation(dataset="none", split="val", images=100, top1=top1, mean_estimated_latency_ms=ms,
                                    mean_mflops=1.0, mean_modules_executed=3.0, mean_measured_latency_ms=ms, architectures=4)
                   for name, top1, ms in (("A", 0.9, 3.0), ("B", 0.85, 2.0), ("C", 0.7, 1.0))}
    export_test_bundle(out, space, controllers=controllers, evaluations=evaluations)
    data = json.loads((out / "manifest.json").read_text())
    data["default_controller"] = "B"
    (out / "manifest.json").write_text(json.dumps(data))
    srv = Server(out, out.parent / "v2-server.log")
    yield srv, Manifest.model_validate(data)
    srv.stop()


@pytest.fixture(scope="module")
def client(v2_server):
    server, _ = v2_server
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def classified(v2_server, hundred_jpegs) -> list[dict]:
    """/classify's answer for every JPEG, all classes listed."""
    server, manifest = v2_server
    out = []
    for data in hundred_jpegs:
        response = httpx.post(server.url + "/classify", content=data, headers={"content-type": "image/jpeg"},
                              params={"top_k": len(manifest.classes)}, timeout=30)
        assert response.status_code == 200, response.text
        out.append(response.json())
    return out


def _as_str(values) -> list[str]:
    """BYTES outputs: bytes from binary data, str from JSON."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def assert_same_as_classify(results: list, classified: list[dict], n_classes: int) -> None:
    probabilities = np.concatenate([r.as_numpy("probabilities") for r in results])
    labels = [s for r in results for s in _as_str(r.as_numpy("label"))]
    index = np.concatenate([r.as_numpy("index") for r in results])
    codes = [s for r in results for s in _as_str(r.as_numpy("architecture"))]
    points = [s for r in results for s in _as_str(r.as_numpy("operating_point"))]
    estimated = np.concatenate([r.as_numpy("estimated_latency_ms") for r in results])
    resolution = np.concatenate([r.as_numpy("resolution") for r in results])
    escalated = np.concatenate([r.as_numpy("escalated") for r in results])
    assert probabilities.shape == (len(classified), n_classes) and probabilities.dtype == np.float32
    assert index.dtype == np.int64 and estimated.dtype == np.float32
    for i, body in enumerate(classified):
        expected = np.zeros(n_classes)
        for score in body["top_k"]:
            expected[score["index"]] = score["probability"]
        assert np.abs(probabilities[i] - expected).max() < 1e-5, i
        assert int(index[i]) == body["prediction"]["index"] and labels[i] == body["prediction"]["label"], i
        assert codes[i] == body["architecture"]["code"], i
        assert points[i] == (body["operating_point"]["name"] or "")
        assert abs(float(estimated[i]) - body["architecture"]["estimated_latency_ms"]) < 1e-3
        assert int(resolution[i]) == body["architecture"]["resolution"] and not escalated[i]
    assert len(set(codes)) > 1  # the images really ran different architectures


def _infer_images(client, model: str, images: list[bytes], binary: bool, **kwargs):
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    else:  # JSON tensors: BYTES elements are strings, so the images go base64
        tensor.set_data_from_numpy(np.array([base64.b64encode(d) for d in images], dtype=np.object_),
                                   binary_data=False)
    return client.infer(model, [tensor], **kwargs)


def test_metadata_and_health(client, v2_server):
    server, manifest = v2_server
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "instanas" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready(manifest.name) and client.is_model_ready(manifest.name, manifest.version)
    assert not client.is_model_ready("nope") and not client.is_model_ready(manifest.name, "0.0.0-other")
    model = client.get_model_metadata(manifest.name)
    assert model["name"] == manifest.name and model["versions"] == [manifest.version]
    assert {(t["name"], t["datatype"]) for t in model["inputs"]} == {("image", "BYTES"), ("input", "FP32")}
    assert [t["name"] for t in model["outputs"]] == OUTPUTS
    assert client.get_model_metadata(manifest.name, manifest.version) == model
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404" and "nope" in info.value.message()
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}


def test_binary_tensors_by_default_answer_as_classify(client, v2_server, hundred_jpegs, classified):
    manifest = v2_server[1]
    results = [_infer_images(client, v2_server[1].name, hundred_jpegs[i:i + CHUNK], binary=True)
               for i in range(0, len(hundred_jpegs), CHUNK)]
    # the client's defaults: binary input, and every output asked back binary
    assert all("binary_data_size" in o["parameters"] for r in results for o in r.get_response()["outputs"])
    assert [o["name"] for o in results[0].get_response()["outputs"]] == OUTPUTS
    assert results[0].get_response()["model_version"] == manifest.version
    assert_same_as_classify(results, classified, len(manifest.classes))


def test_json_tensors_answer_as_classify(client, v2_server, hundred_jpegs, classified):
    manifest = v2_server[1]
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS]
    results = [_infer_images(client, v2_server[1].name, hundred_jpegs[i:i + CHUNK], binary=False, outputs=outputs)
               for i in range(0, len(hundred_jpegs), CHUNK)]
    assert all("data" in o for r in results for o in r.get_response()["outputs"])
    assert_same_as_classify(results, classified, len(manifest.classes))


def _preprocessed(manifest: Manifest, jpegs: list[bytes]) -> np.ndarray:
    """The images as the manifest says to prepare them: [N, 3, H, W] float32."""
    pre = manifest.preprocessing
    return np.stack([imaging.to_input(imaging.to_pixels(imaging.decode(d), pre.input_size), pre) for d in jpegs])


def test_fp32_input_answers_as_classify(client, v2_server, hundred_jpegs, classified):
    manifest = v2_server[1]
    results = []
    for i in range(0, len(hundred_jpegs), CHUNK):
        x = _preprocessed(manifest, hundred_jpegs[i:i + CHUNK])
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=(i // CHUNK) % 2 == 0)  # binary and JSON in turn
        results.append(client.infer(manifest.name, [tensor], model_version=manifest.version))
    assert_same_as_classify(results, classified, len(manifest.classes))


def test_parameters_pick_operating_points_and_architectures(client, v2_server, hundred_jpegs):
    server = v2_server[0]
    images = hundred_jpegs[:8]
    for params, query in [({"operating_point": "A"}, {"operating_point": "A"}),
                          ({"max_latency_ms": 1.5}, {"max_latency_ms": 1.5}),
                          ({"architecture": "mobilenet_v2"}, {"architecture": "mobilenet_v2"}),
                          ({"architecture": "all"}, {"architecture": "all"})]:
        result = _infer_images(client, v2_server[1].name, images, binary=True, parameters=params)
        for data, code, point in zip(images, _as_str(result.as_numpy("architecture")),
                                     _as_str(result.as_numpy("operating_point"))):
            body = httpx.post(server.url + "/classify", content=data, params=query,
                              headers={"content-type": "image/jpeg"}).json()
            assert code == body["architecture"]["code"] and point == (body["operating_point"]["name"] or "")
        assert result.get_response()["parameters"]["operating_point_reason"] == body["operating_point"]["reason"]
    fixed = _infer_images(client, v2_server[1].name, images, binary=True, parameters={"architecture": "mobilenet_v2"})
    assert set(_as_str(fixed.as_numpy("architecture"))) == {"1111"}
    assert set(_as_str(fixed.as_numpy("operating_point"))) == {""}


def test_outputs_asked_by_name_each_binary_or_json(client, v2_server, hundred_jpegs):
    outputs = [triton.InferRequestedOutput("label", binary_data=True), triton.InferRequestedOutput("index", binary_data=False)]
    result = _infer_images(client, v2_server[1].name, hundred_jpegs[:3], binary=True, outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label", "index"] and response["id"] == "req-7"
    assert "binary_data_size" in response["outputs"][0]["parameters"] and "data" in response["outputs"][1]
    assert result.as_numpy("probabilities") is None
    assert len(result.as_numpy("label")) == 3 and result.as_numpy("index").shape == (3,)




def test_an_infer_request_runs_as_one_batch(client, v2_server, hundred_jpegs):
    server = v2_server[0]
    count, total = metric(server.url, "instanas_batch_size_count"), metric(server.url, "instanas_batch_size_sum")
    _infer_images(client, v2_server[1].name, hundred_jpegs[:20], binary=True)  # more than INSTANAS_MAX_BATCH_SIZE (8)
    assert metric(server.url, "instanas_batch_size_count") == count + 1
    assert metric(server.url, "instanas_batch_size_sum") == total + 20


# --- errors: the protocol's {"error": "..."} with proper statuses ----------------------------------------------


def _header(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _binary_request(inputs: list[dict], binary: bytes, **extra) -> tuple[bytes, dict]:
    header = _header(inputs, **extra)
    return header + binary, {"Inference-Header-Content-Length": str(len(header))}


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _error_cases(jpeg: bytes, name: str):
    b64 = base64.b64encode(jpeg).decode()
    image = {"name": "image", "datatype": "BYTES"}
    zeros = [0.0] * (3 * 32 * 32)
    raw = _bytes_tensor([jpeg, jpeg])
    yield "unknown model", "nope", _header([{**image, "shape": [1], "data": [b64]}]), {}, 404, "nope"
    yield "unknown version", f"{name}/versions/9.9", _header([{**image, "shape": [1], "data": [b64]}]), {}, 404, "9.9"
    yield "not json", name, b"{inputs", {}, 400, "JSON"
    yield "no inputs", name, b"{}", {}, 400, "no inputs"
    yield "two inputs", name, _header([{**image, "shape": [1], "data": [b64]}] * 2), {}, 400, "2 inputs"
    yield "unknown input", name, _header([{**image, "name": "pixels", "shape": [1], "data": [b64]}]), {}, 400, "pixels"
    yield "image as INT32", name, _header([{**image, "datatype": "INT32", "shape": [1], "data": [1]}]), {}, 400, "BYTES"
    yield "input as FP64", name, _header([{"name": "input", "datatype": "FP64", "shape": [1, 3, 32, 32],
                                           "data": zeros}]), {}, 400, "FP32"
    yield "image shape [1, 2]", name, _header([{**image, "shape": [1, 2], "data": [b64, b64]}]), {}, 400, "[N]"
    yield "FP32 of another size", name, _header([{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16],
                                                  "data": [0.0] * 768}]), {}, 400, "[N, 3, 32, 32]"
    yield "FP32 too few values", name, _header([{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32],
                                                 "data": zeros}]), {}, 400, "holds"
    yield "FP32 not numbers", name, _header([{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                              "data": ["x"] * len(zeros)}]), {}, 400, "numbers"
    yield "shape and elements differ", name, _header([{**image, "shape": [3], "data": [b64, b64]}]), {}, 400, "holds 2"
    yield "no images", name, _header([{**image, "shape": [0], "data": []}]), {}, 400, "no images"
    yield "bad base64", name, _header([{**image, "shape": [2], "data": [b64, "not base64!"]}]), {}, 400, "image 1"
    yield "corrupt image", name, _header([{**image, "shape": [2], "data": [b64, b64[:40]]}]), {}, 400, "image 1"
    yield "not an image", name, _header([{**image, "shape": [1], "data": [base64.b64encode(b"hello").decode()]}]), \
        {}, 400, "not an image"
    body, headers = _binary_request([{**image, "shape": [2], "parameters": {"binary_data_size": len(raw) + 1}}], raw)
    yield "binary size differs", name, body, headers, 400, "binary_data_size"
    body, headers = _binary_request([{**image, "shape": [2], "parameters": {"binary_data_size": len(raw)}}], raw[:-3])
    yield "binary element cut", name, body, headers, 400, "binary"
    yield "header length past the body", name, b"{}", {"Inference-Header-Content-Length": "99"}, 400, "99"
    yield "unknown output", name, _header([{**image, "shape": [1], "data": [b64]}], outputs=[{"name": "logits"}]), \
        {}, 400, "logits"
    yield "unknown operating point", name, _header([{**image, "shape": [1], "data": [b64]}],
                                                   parameters={"operating_point": "Z"}), {}, 400, "'Z'"
    yield "invalid architecture", name, _header([{**image, "shape": [1], "data": [b64]}],
                                                parameters={"architecture": "zz"}), {}, 400, "architecture"
    yield "conflicting options", name, _header([{**image, "shape": [1], "data": [b64]}],
                                               parameters={"architecture": "all", "operating_point": "A"}), {}, 400, \
        "architecture"
    yield "infinite budget", name, _header([{**image, "shape": [1], "data": [b64]}],
                                           parameters={"max_latency_ms": float("inf")}), {}, 400, "finite"
    yield "too many images", name, _header([{**image, "shape": [33], "data": [b64] * 33}]), {}, 413, "33"


@pytest.mark.parametrize("case", [c[0] for c in _error_cases(b"x", "m")])
def test_refusals_are_the_protocols_errors(v2_server, hundred_jpegs, case):
    server, manifest = v2_server
    _, model, body, headers, status, fragment = next(c for c in _error_cases(hundred_jpegs[0], manifest.name)
                                                     if c[0] == case)
    response = httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str), error
    assert fragment in error["error"], error
    assert response.headers["x-request-id"]
    ok = httpx.post(f"{server.url}/v2/models/{manifest.name}/infer", timeout=30,
                    content=_header([{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "data": [base64.b64encode(hundred_jpegs[0]).decode()]}]))
    assert ok.status_code == 200, ok.text  # and the server still serves


def test_tritonclient_sees_the_errors(client, v2_server, hundred_jpegs):
    manifest = v2_server[1]
    with pytest.raises(InferenceServerException) as info:
        _infer_images(client, "nope", hundred_jpegs[:1], binary=True)
    assert info.value.status() == "404"
    tensor = triton.InferInput("input", [1, 3, 16, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(manifest.name, [tensor])
    assert info.value.status() == "400" and "[N, 3, 32, 32]" in info.value.message()


def test_other_v2_paths_and_methods(v2_server):
    server, manifest = v2_server
    wrong_method = httpx.get(f"{server.url}/v2/models/{manifest.name}/infer")
    assert wrong_method.status_code == 405 and list(wrong_method.json()) == ["error"]
    unknown = httpx.get(f"{server.url}/v2/models/{manifest.name}/stats")
    assert unknown.status_code == 404 and list(unknown.json()) == ["error"]
    # /classify keeps its own error shape
    other = httpx.post(server.url + "/classify", content=b"", headers={"content-type": "image/jpeg"})
    assert other.status_code == 400 and other.json()["error"]["code"] == "empty_body"
