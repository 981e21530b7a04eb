"""The committed default bundle: trained on the real CIFAR-10 JPEGs, and as accurate as it says."""

from __future__ import annotations

import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import imaging
from service.bundle import load_bundle
from service.executor import Executor
from service.settings import DEFAULT_MODEL, MODELS

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_MODEL)  # verifies every sha256


def test_make_train_default_resumes_the_committed_run_of_the_default_bundle():
    """The Makefile's RUN_DEFAULT holds the default bundle's run, started with the `cifar10-cpu` preset as
    it is now: `make train-default` resumes that folder instead of refusing a changed config."""
    import json
    import re

    from training.config import load_config
    from training.rundir import config_changes

    root = MODELS.parent
    run = root / re.search(r"^RUN_DEFAULT := (\S+)$", (root / "Makefile").read_text(), re.MULTILINE).group(1)
    for phase in ("baseline.pt", "pretrain.pt", "search.pt", "finetune.pt", "latency.json", "log.jsonl"):
        assert (run / phase).is_file(), phase
    preset = json.loads(json.dumps(load_config("cifar10-cpu").to_dict()))
    assert config_changes(json.loads((run / "config.json").read_text()), preset) == {}


def test_default_bundle_is_a_real_cifar10_instanas_model(bundle):
    m = bundle.manifest
    assert m.name == "cifar10-default" and m.classes == CIFAR10 and m.dataset == "cifar10-jpeg"
    assert m.controllers and (m.search_space.num_cells, m.search_space.num_modules) == (17, 5)
    evaluation = m.point().evaluation
    assert evaluation.split == "test" and evaluation.images == 8000
    assert evaluation.top1 >= 0.83  # a trained CIFAR-10 model; the default point measured 0.8514 (docs/RESULTS.md)
    controls = m.training["controller_controls"]  # one search's operating points, each with its control
    assert list(controls) == ["A", "B", "C", "D", "E"]
    # B deals its two architectures no better than at random on validation, so it is not served
    assert [c.name for c in m.controllers] == [n for n, f in controls.items() if f["served"]] == ["A", "C", "D", "E"]
    size = sum(f.stat().st_size for f in Path(bundle.path).rglob("*") if f.is_file())
    assert size < 8 * 2**20  # small enough to live in git


def test_the_same_width_mobilenet_v2_ships_beside_it_as_a_static_bundle(bundle):
    static = load_bundle(MODELS / "cifar10-default-mobilenet_v2")
    m = static.manifest
    assert m.fixed_architecture == "1" * 17 and len(m.blocks) == 17 and not m.controllers
    assert m.search_space.width_multiplier == bundle.manifest.search_space.width_multiplier
    assert m.evaluation.split == "test" and m.evaluation.images == 8000
    assert m.evaluation.top1 >= 0.836  # a trained MobileNetV2 0.25x; 0.8598 measured


def test_served_accuracy_on_the_test_split_is_the_manifests(bundle, data_root):
    """All 8,000 test JPEGs through the service's decoder and executor reproduce the recorded top-1."""
    m = bundle.manifest
    pre = m.preprocessing
    inputs, labels = [], []
    with tarfile.open(data_root / "test.tar.gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                image = imaging.decode(tar.extractfile(member).read())
                inputs.append(imaging.to_input(imaging.to_pixels(image, pre.input_size), pre))
                labels.append(m.classes.index(Path(member.name).parent.name))
    x, labels = np.stack(inputs), np.array(labels)
    assert len(labels) == 8000
    executor = Executor(bundle)
    # the default point, and the point that is more accurate than the static baseline
    for point in (m.default_controller, "cascade-top"):
        predictions, architectures = [], []
        for i in range(0, len(x), 500):
            result = executor.run(x[i : i + 500], operating_point=point)
            predictions.append(result.logits.argmax(1))
            architectures.append(result.executed)
        top1 = float((np.concatenate(predictions) == labels).mean())
        evaluation = m.point(point).evaluation
        assert abs(top1 - evaluation.top1) <= 0.002, (point, top1, evaluation.top1)
        if point == m.default_controller:
            executed = np.concatenate(architectures)
            assert abs(executed.sum((1, 2)).mean() - evaluation.mean_modules_executed) < 0.01
    static = load_bundle(MODELS / f"{DEFAULT_MODEL.name}-mobilenet_v2").manifest.evaluation
    assert m.point("cascade-top").evaluation.top1 > static.top1


def test_make_serve_command_serves_the_default_bundle(tmp_path, test_jpegs):
    """`instanas-serve` on models/cifar10-default (what `make serve` runs) recognises real images."""
    from tests.conftest import Server

    srv = Server(DEFAULT_MODEL, tmp_path / "log")
    try:
        correct = 0
        for label, data in test_jpegs:
            body = httpx.post(srv.url + "/classify", content=data, headers={"content-type": "image/jpeg"}).json()
            correct += body["prediction"]["label"] == label
            assert body["model"]["name"] == "cifar10-default"
        assert correct >= 8  # of 20; chance is 2
    finally:
        srv.stop()


def _close(shown, fresh, where: str = "") -> list[str]:
    """Where two parsed JSON values differ (numbers by more than 2e-4)."""
    if isinstance(shown, dict) and isinstance(fresh, dict):
        if shown.keys() != fresh.keys():
            return [f"{where or '.'}: keys {sorted(shown)} != {sorted(fresh)}"]
        return [d for k in shown for d in _close(shown[k], fresh[k], f"{where}.{k}")]
    if isinstance(shown, list) and isinstance(fresh, list) and len(shown) == len(fresh):
        return [d for i, (a, b) in enumerate(zip(shown, fresh)) for d in _close(a, b, f"{where}[{i}]")]
    if isinstance(shown, (int, float)) and isinstance(fresh, (int, float)) and not isinstance(shown, bool):
        return [] if abs(shown - fresh) <= 2e-4 else [f"{where}: {shown} != {fresh}"]
    return [] if shown == fresh else [f"{where}: {shown!r} != {fresh!r}"]


def test_the_readme_example_is_what_the_default_bundle_answers(data_root):
    """The example responses of README.md and docs/API.md (scripts/readme_example.py) against fresh
    answers from the served default bundle: same model version, prediction, architecture, point and stages."""
    import sys

    sys.path.insert(0, str(MODELS.parent / "scripts"))
    import readme_example

    examples = readme_example.shown()
    assert [(page.name, query) for page, query, _ in examples] == [("README.md", ""), ("API.md", "operating_point=A")]
    for page, query, shown in examples:
        fresh = readme_example.answer(data_root / "test.tar.gz", query)
        shown.pop("latency_ms"), fresh.pop("latency_ms")
        differences = _close(shown, fresh)
        assert not differences, (f"{page.name}'s example response is stale; run scripts/readme_example.py --write:\n"
                                 + "\n".join(differences))
