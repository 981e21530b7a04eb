"""A model repository (one bundle per subfolder) served at once by a real server: each model
under its name in /classify, /model and /v2 (tritonclient, unmodified), metrics labelled by
model, the default model, reloads that add and drop models, and the refusals at start-up."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from service.bench import static_view
from tests.conftest import Server, metric, run_cli
from tests.helpers import export_test_bundle, three_points
from training.searchspace import build_tiny_space

INSTANAS, STATIC = "instanas", "instanas-mobilenet_v2"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """models/instanas (three operating points) and models/instanas-mobilenet_v2 (its static
    MobileNetV2 path, a bundle of one module per cell), plus a third bundle kept outside."""
    root = tmp_path_factory.mktemp("repository")
    space = build_tiny_space()
    export_test_bundle(root / "models" / INSTANAS, space, controllers=three_points(space), default_controller="B",
                       name=INSTANAS)
    static_view(root / "models" / INSTANAS, root / "models" / STATIC, name=STATIC)
    export_test_bundle(root / "spare", space, seed=5, name="spare")
    (root / "models" / "notes").mkdir()  # a folder without a manifest: ignored
    return root


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    srv = Server(repository / "models", tmp_path_factory.mktemp("log") / "server.log",
                 INSTANAS_DEFAULT_MODEL=STATIC)
    yield srv
    srv.stop()


def classify(url: str, jpeg: bytes, **params) -> httpx.Response:
    return httpx.post(url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"}, params=params,
                      timeout=30)


def test_every_model_is_served_under_its_name_and_the_default_answers_the_rest(server, test_jpegs):
    listed = httpx.get(server.url + "/models").json()
    assert listed["default"] == STATIC
    assert [m["name"] for m in listed["models"]] == [INSTANAS, STATIC]  # "notes" holds no bundle
    jpeg = test_jpegs[0][1]
    default = classify(server.url, jpeg).json()
    assert default["model"]["name"] == STATIC and default["architecture"]["code"] == "1111"
    assert default["operating_point"]["name"] is None
    chosen = classify(server.url, jpeg, model=INSTANAS).json()
    assert chosen["model"]["name"] == INSTANAS and chosen["operating_point"] == {"name": "B", "reason": "default"}
    assert classify(server.url, jpeg, model=INSTANAS, operating_point="A").json()["operating_point"]["name"] == "A"
    # what is asked of one model is checked against that model
    refused = classify(server.url, jpeg, model=STATIC, operating_point="A")
    assert refused.status_code == 422, refused.text
    unknown = classify(server.url, jpeg, model="nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
    assert INSTANAS in unknown.json()["error"]["message"]
    manifest = httpx.get(server.url + "/model", params={"model": INSTANAS}).json()
    assert manifest["name"] == INSTANAS and [c["name"] for c in manifest["controllers"]] == ["A", "B", "C"]
    assert httpx.get(server.url + "/model").json()["name"] == STATIC
    assert httpx.get(server.url + "/model", params={"model": "nope"}).status_code == 404
    ready = httpx.get(server.url + "/healthz/ready").json()
    assert ready["status"] == "ready" and ready["model"]["name"] == STATIC


def test_tritonclient_reaches_each_model_by_name(server, test_jpegs):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_ready()
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {(INSTANAS, "READY"), (STATIC, "READY")}
    jpegs = [data for _, data in test_jpegs[:6]]
    for name in (INSTANAS, STATIC):
        assert client.is_model_ready(name) and client.get_model_metadata(name)["name"] == name
        tensor = triton.InferInput("image", [len(jpegs)], "BYTES")
        tensor.set_data_from_numpy(np.array(jpegs, dtype=object))
        result = client.infer(name, [tensor], outputs=[triton.InferRequestedOutput(n) for n in ("label", "architecture")])
        assert result.get_response()["model_name"] == name
        for i, jpeg in enumerate(jpegs):
            body = classify(server.url, jpeg, model=name).json()
            assert result.as_numpy("label")[i].decode() == body["prediction"]["label"], (name, i)
            assert result.as_numpy("architecture")[i].decode() == body["architecture"]["code"], (name, i)
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


def test_metrics_are_labelled_by_model(server, test_jpegs):
    executions = "instanas_module_executions_total"
    static_before = metric(server.url, executions, model=STATIC, cell="0", module="0")
    instanas_before = metric(server.url, executions, model=INSTANAS)
    for _, jpeg in test_jpegs[:5]:
        assert classify(server.url, jpeg, model=STATIC).status_code == 200
    assert metric(server.url, executions, model=STATIC, cell="0", module="0") == static_before + 5
    assert metric(server.url, executions, model=INSTANAS) == instanas_before  # the other model ran nothing
    assert metric(server.url, "instanas_architecture_modules_count", model=STATIC) >= 5
    info = metric(server.url, "instanas_model_info", name=INSTANAS) + metric(server.url, "instanas_model_info", name=STATIC)
    assert info == 2


def test_a_reload_adds_and_drops_models(repository, tmp_path, test_jpegs):
    models = tmp_path / "models"
    shutil.copytree(repository / "models", models)
    srv = Server(models, tmp_path / "server.log")
    try:
        jpeg = test_jpegs[0][1]
        assert classify(srv.url, jpeg).json()["model"]["name"] == INSTANAS  # the first name in sorted order
        shutil.copytree(repository / "spare", models / "spare")
        added = httpx.post(srv.url + "/admin/reload", timeout=120)
        assert added.status_code == 200, added.text
        assert [m["name"] for m in added.json()["models"]] == [INSTANAS, STATIC, "spare"]
        assert classify(srv.url, jpeg, model="spare").json()["model"]["name"] == "spare"
        shutil.rmtree(models / STATIC)
        dropped = httpx.post(srv.url + "/admin/reload", timeout=120)
        assert [m["name"] for m in dropped.json()["models"]] == [INSTANAS, "spare"]
        assert classify(srv.url, jpeg, model=STATIC).status_code == 404
        assert metric(srv.url, "instanas_model_info", name=STATIC) == 0
        # a repository that cannot be served leaves the one served now
        (models / "spare" / "manifest.json").write_text("{")
        refused = httpx.post(srv.url + "/admin/reload", timeout=120)
        assert refused.status_code == 422 and "spare" in refused.json()["error"]["message"]
        assert classify(srv.url, jpeg, model="spare").status_code == 200
    finally:
        srv.stop()


def test_start_up_refuses_a_repository_it_cannot_serve(repository, tmp_path):
    misnamed = tmp_path / "misnamed"
    shutil.copytree(repository / "spare", misnamed / "other")
    done = run_cli("instanas-serve", "--model", str(misnamed), "--port", "0", timeout=60)
    assert done.returncode == 2 and "named as its model" in done.stderr and "'spare'" in done.stderr, done.stderr

    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    done = run_cli("instanas-serve", "--model", str(empty), "--port", "0", timeout=60)
    assert done.returncode == 2 and "neither a model bundle nor a model repository" in done.stderr, done.stderr

    done = run_cli("instanas-serve", "--model", str(repository / "models"), "--port", "0", timeout=60,
                   INSTANAS_DEFAULT_MODEL="nope")
    assert done.returncode == 2 and "INSTANAS_DEFAULT_MODEL is 'nope'" in done.stderr, done.stderr

    broken = tmp_path / "broken"
    shutil.copytree(repository / "models", broken)
    data = json.loads((broken / STATIC / "manifest.json").read_text())
    (broken / STATIC / data["head"]["file"]).write_bytes(b"changed")
    done = run_cli("instanas-serve", "--model", str(broken), "--port", "0", timeout=60)
    assert done.returncode == 2 and STATIC in done.stderr and "sha256" in done.stderr, done.stderr
