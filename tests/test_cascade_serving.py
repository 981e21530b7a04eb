"""Cascade operating points served: the bundle's networks, parity of every stage, refusals at
load, and real HTTP and v2 answers that say what ran, with their metrics."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from service import architecture
from service import cascade as serving
from service.bundle import BundleError, load_bundle, sha256_file
from service.executor import Executor
from service.metrics import sample
from training.evaluate import fixed_policy

from .conftest import Server
from .helpers import export_cascade_bundle, export_test_bundle


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade") / "bundle"
    built = export_cascade_bundle(out)
    return out, built


def _inputs(n: int = 48, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _torch(model, x: np.ndarray, resolution: int) -> np.ndarray:
    t = torch.from_numpy(x)
    with torch.no_grad():
        pooled = torch.nn.functional.avg_pool2d(t, 32 // resolution) if resolution < 32 else t
        return model.forward_selected(pooled, fixed_policy(np.ones((model.space.num_cells, 1), bool))(t)).numpy()


def test_each_stage_answers_as_its_network_run_alone(cascade_bundle):
    """Rows the 16x16 stage answers carry exactly that network's logits at 16x16 (PyTorch, 1e-5);
    the others, the 32x32 network's; which rows stop is the threshold's call on the first stage."""
    out, built = cascade_bundle
    executor = Executor(load_bundle(out))
    x = _inputs()
    result = executor.run(x, operating_point="fast")
    low = _torch(built["models"]["mobilenet_v2@16"], x, 16)
    high = _torch(built["models"]["mobilenet_v2"], x, 32)
    stops = serving.confidence("max_softmax", low) >= built["threshold"]
    answered = np.array([t.answered for t in result.traces])
    assert 0 < stops.sum() < len(x), "the case must exercise both stages"
    assert np.array_equal(answered == 0, stops)
    assert np.abs(result.logits[stops] - low[stops]).max() < 1e-5
    assert np.abs(result.logits[~stops] - high[~stops]).max() < 1e-5
    # and each equals the network's own executor, run alone on the pooled input
    alone = executor.networks["mobilenet_v2@16"].run(serving.pool(x, 16))
    assert np.abs(result.logits[stops] - alone.logits[stops]).max() < 1e-5
    assert [t.stage.resolution for t in result.traces] == [16 if s else 32 for s in stops]


def _gate_weights(classes: int, seed: int = 5) -> list[float]:
    return np.random.default_rng(seed).normal(scale=2.0, size=2 * classes + 3).tolist()


@pytest.mark.parametrize("kind, share", [("max_softmax", 0.0), ("margin", 0.3), ("gate", 0.2)])
def test_one_image_at_a_time_answers_as_the_batch_does(cascade_bundle, tmp_path, kind, share):
    """The single-row path (batch 1, the common case) stops each image at the same stage, with the
    same logits, probabilities and confidences, as the batched path, for each confidence kind, blended or not."""
    out = tmp_path / "bundle"
    shutil.copytree(cascade_bundle[0], out)
    x = _inputs(24, seed=3)
    low = _torch(cascade_bundle[1]["models"]["mobilenet_v2@16"], x, 16)
    weights = _gate_weights(low.shape[1]) if kind == "gate" else None
    threshold = float(np.median(serving.confidence(kind, low, weights)))
    _edit(out, lambda d: (d["cascades"][0]["stages"][0].update(confidence=kind, threshold=threshold, gate=weights),
                          d["cascades"][0]["stages"][1].update(blend=share)))
    executor = Executor(load_bundle(out))
    batch = executor.run(x, operating_point="fast")
    assert len({t.answered for t in batch.traces}) == 2
    for row in range(len(x)):
        alone = executor.run(x[row : row + 1], operating_point="fast")
        assert alone.traces[0].answered == batch.traces[row].answered
        assert alone.traces[0].confidences == pytest.approx(batch.traces[row].confidences, abs=1e-9)
        assert np.abs(alone.logits[0] - batch.logits[row]).max() < 1e-5
        assert np.abs(alone.probabilities[0] - batch.probabilities[row]).max() < 1e-6
        assert alone.logits.dtype == alone.probabilities.dtype == np.float32


def test_a_gate_stage_scores_as_training_fitted_it(cascade_bundle, tmp_path):
    """A stage with a learned gate (training/gate.py) stops exactly the rows whose served confidence,
    one minus the gate's score of the stage's answer as training computes it, reaches the threshold."""
    from training import gate

    out = tmp_path / "bundle"
    shutil.copytree(cascade_bundle[0], out)
    x = _inputs()
    low = _torch(cascade_bundle[1]["models"]["mobilenet_v2@16"], x, 16)
    weights = np.array(_gate_weights(low.shape[1], seed=9))
    expected = 1.0 - gate.score(weights, gate.features(low))
    threshold = float(np.quantile(expected, 0.4))
    _edit(out, lambda d: d["cascades"][0]["stages"][0].update(confidence="gate", gate=weights.tolist(),
                                                                threshold=threshold))
    executor = Executor(load_bundle(out))
    result = executor.run(x, operating_point="fast")
    served = np.array([t.confidences[0] for t in result.traces])
    assert np.abs(served - expected).max() < 1e-9
    assert np.array_equal(np.array([t.answered for t in result.traces]) == 0, expected >= threshold)
    one = executor.run(x[:1], operating_point="fast").traces[0].confidences[0]
    assert one == pytest.approx(expected[0], abs=1e-9)


def test_a_blending_stage_mixes_the_previous_answer_in(cascade_bundle, tmp_path):
    """With blend 0.3 on the last stage, an escalated image's answer is log(0.7 softmax(32x32) +
    0.3 softmax(16x16)) of the networks run alone in PyTorch; the rows the first stage answers are
    unchanged; one image at a time answers as the batch does."""
    out = tmp_path / "bundle"
    shutil.copytree(cascade_bundle[0], out)
    _edit(out, lambda d: d["cascades"][0]["stages"][1].update(blend=0.3))
    built = cascade_bundle[1]
    executor = Executor(load_bundle(out))
    x = _inputs()
    result = executor.run(x, operating_point="fast")
    low = _torch(built["models"]["mobilenet_v2@16"], x, 16).astype(np.float64)
    high = _torch(built["models"]["mobilenet_v2"], x, 32).astype(np.float64)
    stops = serving.confidence("max_softmax", low) >= built["threshold"]
    assert 0 < stops.sum() < len(x)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    mixed = np.log(0.7 * softmax(high) + 0.3 * softmax(low))
    assert np.abs(result.logits[~stops] - mixed[~stops]).max() < 1e-5
    assert np.abs(result.logits[stops] - low[stops]).max() < 1e-5
    assert np.abs(result.probabilities[~stops] - np.exp(mixed[~stops])).max() < 1e-6
    for row in np.flatnonzero(~stops)[:3]:
        alone = executor.run(x[row : row + 1], operating_point="fast")
        assert alone.traces[0].answered == 1 and np.abs(alone.logits[0] - result.logits[row]).max() < 1e-5


def test_a_batch_mixing_cascade_and_controller_rows(cascade_bundle):
    out, _ = cascade_bundle
    executor = Executor(load_bundle(out))
    x = _inputs(6)
    mixed = executor.run_batch(x, ["fast", "A", None, "A", "fast", None], [None] * 6)
    alone_a = executor.run(x[[1, 3]], operating_point="A")
    alone_fast = executor.run(x[[0, 2, 4, 5]], operating_point="fast")
    assert np.abs(mixed.logits[[1, 3]] - alone_a.logits).max() < 1e-5
    assert np.abs(mixed.logits[[0, 2, 4, 5]] - alone_fast.logits).max() < 1e-5
    assert [t is None for t in mixed.traces] == [False, True, False, True, False, False]
    # the codes a result gives are its architectures' (a mixed batch's are left to the caller to encode)
    assert mixed.codes is None
    for cascaded in (executor.run_batch(x, ["fast"] * 6, [None] * 6), alone_fast, executor.run(x[:1], operating_point="fast")):
        assert cascaded.codes == architecture.encode_many(cascaded.executed)


def test_pool_is_the_mean_of_each_square():
    x = _inputs(2)
    expected = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 2).numpy()
    assert np.abs(serving.pool(x, 16) - expected).max() < 1e-6 and serving.pool(x, 32) is x


def _edit(out, change) -> None:
    data = json.loads((out / "manifest.json").read_text())
    change(data)
    (out / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["cascades"][0]["stages"][0].update(network="nope"), "network 'nope' is not one of"),
    (lambda d: d["networks"][0].update(resolution=24), "network 'mobilenet_v2@16': resolution 24 is not one of the "
     "search space's resolutions [16, 32]"),
    (lambda d: d["search_space"].update(resolutions=[16, 24, 32]), "resolution 24 must divide the input size 32"),
    (lambda d: d["search_space"].update(resolutions=[32, 16]), "resolutions [32, 16] must rise"),
    (lambda d: d["search_space"].update(resolutions=[16]), "to the input size 32"),
    (lambda d: d["search_space"].update(resolutions=[0, 32]), "resolution 0 must divide the input size 32"),
    (lambda d: d["search_space"].update(resolutions=[2, 32]), "be at least the total stride"),
    (lambda d: d["cascades"][0]["stages"][1].update(threshold=0.5), "last stage answers every image"),
    (lambda d: d["cascades"][0]["stages"][0].update(threshold=None), "stage 0 needs a threshold"),
    (lambda d: d["cascades"][0]["stages"][0].update(confidence="entropy"), "max_softmax"),
    (lambda d: d["cascades"][0]["stages"][0].update(confidence="gate"), "a gate's weights go with confidence 'gate'"),
    (lambda d: d["cascades"][0]["stages"][0].update(gate=[0.0] * 23), "a gate's weights go with confidence 'gate'"),
    (lambda d: d["cascades"][0]["stages"][0].update(confidence="gate", gate=[0.0] * 22),
     "the gate has 22 weights; 10 classes need 23"),
    (lambda d: d["cascades"][0]["stages"][0].update(blend=0.2), "the first stage has no previous answer to blend"),
    (lambda d: d["cascades"][0]["stages"][1].update(blend=1.0), "blend"),
    (lambda d: d["cascades"][0].update(name="A"), "operating point names repeat"),
    (lambda d: d["networks"][1].update(name="mobilenet_v2@16"), "network names repeat"),
    (lambda d: d.update(default_controller="slow"), "default_controller 'slow' is not one of"),
    (lambda d: (d["search_space"].update(resolutions=[8, 16, 32]), d["networks"][0].update(resolution=8)),
     "takes 16x16 inputs, but the manifest gives it resolution 8"),
    (lambda d: d["cascades"][0]["stages"][0].update(architecture="1111111"), "cascade 'fast', stage 0: architecture code"),
    (lambda d: d["networks"][0].update(sha256="0" * 64), "manifest.json has sha256"),
    (lambda d: d["networks"][0].update(path="../elsewhere"), "outside the bundle"),
])
def test_an_inconsistent_cascade_is_refused_at_load(cascade_bundle, tmp_path, change, message):
    out = tmp_path / "bundle"
    shutil.copytree(cascade_bundle[0], out)
    _edit(out, change)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(out)


def test_a_manifest_written_before_resolutions_were_listed_still_loads(cascade_bundle, tmp_path):
    """No `search_space.resolutions`: each network's resolution need only divide the input size."""
    out = tmp_path / "bundle"
    shutil.copytree(cascade_bundle[0], out)
    _edit(out, lambda d: d["search_space"].pop("resolutions"))
    assert load_bundle(out).manifest.search_space.resolutions == []
    _edit(out, lambda d: d["networks"][0].update(resolution=24))
    with pytest.raises(BundleError, match="resolution 24 does not divide the input size 32"):
        load_bundle(out)


def test_a_graph_of_another_resolution_is_refused_at_load(cascade_bundle, tmp_path):
    """The 16x16 network's stem swapped for the 32x32 one's (hashes updated all the way up): refused,
    the file named, rather than failing on the first request."""
    out = tmp_path / "bundle"
    shutil.copytree(cascade_bundle[0], out)
    low, high = out / "networks" / "mobilenet_v2@16", out / "networks" / "mobilenet_v2"
    shutil.copy(high / "stem.onnx", low / "stem.onnx")
    _edit(low, lambda d: d["stem"].update(sha256=sha256_file(low / "stem.onnx")))
    _edit(out, lambda d: d["networks"][0].update(sha256=sha256_file(low / "manifest.json")))
    with pytest.raises(BundleError, match=r"network 'mobilenet_v2@16'.*stem.onnx takes inputs of shape \[.*32, 32\]"):
        load_bundle(out)


def test_a_network_with_other_cells_is_refused(tmp_path):
    from training.searchspace import build_tiny_space

    out = tmp_path / "bundle"
    export_cascade_bundle(out)
    other = tmp_path / "other"
    export_test_bundle(other, build_tiny_space(10, 16), with_controller=False)  # every module, not a prefix... of 1
    shutil.rmtree(out / "networks" / "mobilenet_v2@16")
    shutil.copytree(other, out / "networks" / "mobilenet_v2@16")
    _edit(out, lambda d: d["networks"][0].update(sha256=sha256_file(out / "networks" / "mobilenet_v2@16" / "manifest.json")))
    load_bundle(out)  # the tiny space's every module is the bundle's: accepted
    _edit(other, lambda d: d["search_space"]["cells"][0].update(out_channels=d["search_space"]["cells"][0]["out_channels"] + 1))
    shutil.rmtree(out / "networks" / "mobilenet_v2@16")
    shutil.copytree(other, out / "networks" / "mobilenet_v2@16")
    _edit(out, lambda d: d["networks"][0].update(sha256=sha256_file(out / "networks" / "mobilenet_v2@16" / "manifest.json")))
    with pytest.raises(BundleError, match="network 'mobilenet_v2@16'"):
        load_bundle(out)


@pytest.fixture(scope="module")
def cascade_server(cascade_bundle, tmp_path_factory):
    srv = Server(cascade_bundle[0], tmp_path_factory.mktemp("cascade-server") / "server.log")
    yield srv
    srv.stop()


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_http_answers_say_which_stage_answered_at_which_resolution(cascade_server):
    before = httpx.get(cascade_server.url + "/metrics").text
    bodies = []
    for seed in range(24):
        r = httpx.post(cascade_server.url + "/classify", content=_png(seed), headers={"content-type": "image/png"},
                       timeout=30)
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    for body in bodies:
        assert body["operating_point"] == {"name": "fast", "reason": "default"}
        stages, arch = body["cascade"]["stages"], body["architecture"]
        assert stages[-1]["answered"] and not any(s["answered"] for s in stages[:-1])
        assert body["cascade"]["escalated"] == (len(stages) == 2)
        assert (arch["resolution"], arch["network"]) == (stages[-1]["resolution"], stages[-1]["network"])
        assert stages[0]["resolution"] == 16 and (stages[0]["confidence"] >= stages[0]["threshold"]) == (len(stages) == 1)
        assert arch["estimated_latency_ms"] == pytest.approx(0.06 * len(stages), abs=2e-3)  # 6 unit graphs a stage
    resolutions = [b["architecture"]["resolution"] for b in bodies]
    assert set(resolutions) == {16, 32}, "both stages must answer some of these images"
    after = httpx.get(cascade_server.url + "/metrics").text
    for r in (16, 32):
        grown = sample(after, "instanas_resolution_total", model="cascade", resolution=str(r)) - \
            sample(before, "instanas_resolution_total", model="cascade", resolution=str(r))
        assert grown == resolutions.count(r)
    escalated = sample(after, "instanas_escalations_total", model="cascade", operating_point="fast") - \
        sample(before, "instanas_escalations_total", model="cascade", operating_point="fast")
    assert escalated == resolutions.count(32)
    # the controller point of the same bundle answers at full resolution, no cascade
    r = httpx.post(cascade_server.url + "/classify", params={"operating_point": "A"}, content=_png(0),
                   headers={"content-type": "image/png"}, timeout=30).json()
    assert r["cascade"] is None and r["architecture"]["resolution"] == 32 and r["architecture"]["network"] is None


def test_v2_outputs_the_resolution_and_the_escalation(cascade_server):
    client = triton.InferenceServerClient(cascade_server.url.removeprefix("http://"), network_timeout=60)
    try:
        images = [_png(seed) for seed in range(12)]
        tensor = triton.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary)
                   for name, binary in (("resolution", True), ("escalated", False), ("operating_point", True))]
        result = client.infer("cascade", [tensor], outputs=outputs)
        resolution, escalated = result.as_numpy("resolution"), result.as_numpy("escalated")
        assert resolution.dtype == np.int64 and escalated.dtype == np.bool_
        assert set(resolution.tolist()) <= {16, 32} and np.array_equal(escalated, resolution == 32)
        classified = [httpx.post(cascade_server.url + "/classify", content=image, headers={"content-type": "image/png"},
                                 timeout=30).json()["architecture"]["resolution"] for image in images]
        assert resolution.tolist() == classified
        meta = client.get_model_metadata("cascade")
        assert {"name": "resolution", "datatype": "INT64", "shape": [-1]} in meta["outputs"]
    finally:
        client.close()


def test_one_image_whose_blend_underflows_answers_as_the_batch_does():
    """Logits so far apart that both stages give a class probability 0: the blend's log is -inf for
    it, on the single-row path as on the batched one (numpy), not an error."""
    import types
    import warnings

    far = np.array([[0.0, -1000.0, -1000.0]], np.float32)
    stages = [types.SimpleNamespace(logits=lambda x: np.repeat(far, len(x), 0), blend=0.0, confidence="margin", gate=None,
                                    threshold=1.5),  # every image escalates
              types.SimpleNamespace(logits=lambda x: np.repeat(far[:, ::-1], len(x), 0), blend=0.3,
                                    confidence="max_softmax", gate=None, threshold=None)]
    runner = serving.CascadeRunner.__new__(serving.CascadeRunner)
    runner.name, runner.stages = "far", stages
    alone = runner.run(np.zeros((1, 3, 2, 2), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's log(0)
        batch = runner.run(np.zeros((2, 3, 2, 2), np.float32))
    assert alone[0][0, 1] == batch[0][0, 1] == -np.inf and alone[2][0].answered == 1
    assert np.allclose(alone[0][0, [0, 2]], batch[0][0, [0, 2]]) and np.allclose(alone[1][0], batch[1][0])
