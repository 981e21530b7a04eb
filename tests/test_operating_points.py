"""Bundles with several operating points: each controller served exactly, chosen by name, by
latency budget or by default; architecture overrides; clear 422s for options that do not fit."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from service import architecture
from service.bundle import load_bundle, read_manifest
from service.app import create_app
from service.executor import Executor
from service.governor import LoadGovernor
from service.manifest import Evaluation, Manifest, Validation
from service.operating_points import choose
from service.settings import Settings
from tests.conftest import Server, metric, wait_until
from tests.helpers import export_test_bundle, three_points
from training.searchspace import build_tiny_space

TOLERANCE = 1e-4


def _evaluation(top1: float, ms: float) -> Evaluation:
    return Evaluation(dataset="none", split="val", images=100, top1=top1, mean_estimated_latency_ms=ms * 0.9,
                      mean_mflops=1.0, mean_modules_executed=3.0, mean_measured_latency_ms=ms, architectures=4)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Three operating points A (slow, accurate) .. C (fast), B the default."""
    space = build_tiny_space()
    out = tmp_path_factory.mktemp("multi")
    controllers = three_points(space)
    evaluations = {"A": _evaluation(0.90, 3.0), "B": _evaluation(0.85, 2.0), "C": _evaluation(0.70, 1.0)}
    metagraph, _, _ = export_test_bundle(out, space, controllers=controllers, evaluations=evaluations,
                                         default_controller="B")
    return out, metagraph, controllers


def test_each_operating_point_serves_its_own_controller_exactly(multi):
    out, metagraph, controllers = multi
    executor = Executor(load_bundle(out))
    assert executor.operating_points == ["A", "B", "C"] and executor.manifest.point_name(None) == "B"
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    modules = {}
    for name, controller in controllers.items():
        result = executor.run(x.numpy(), operating_point=name)
        with torch.no_grad():
            policy = controller(x) >= 0.5
            expected = metagraph(x, policy).numpy()
        assert result.operating_point == name
        assert np.array_equal(result.executed, architecture.apply_empty_cell_rule(policy.numpy(), metagraph.space))
        assert np.abs(result.logits - expected).max() < TOLERANCE
        modules[name] = result.executed.sum()
    assert modules["A"] >= modules["B"] >= modules["C"] and modules["A"] > modules["C"]  # the points really differ
    assert executor.run(x.numpy()).operating_point == "B"


def test_choice_by_name_budget_and_default(multi):
    manifest, _ = read_manifest(multi[0])
    assert choose(manifest).operating_point == "B" and choose(manifest).reason == "default"
    assert (choose(manifest, operating_point="C").operating_point, choose(manifest, operating_point="C").reason) == ("C", "requested")
    assert choose(manifest, max_latency_ms=5).operating_point == "A"  # all fit: the most accurate
    assert choose(manifest, max_latency_ms=2.5).operating_point == "B"
    picked = choose(manifest, max_latency_ms=0.5)
    assert (picked.operating_point, picked.reason) == ("C", "over_budget")  # none fits: the fastest
    given = choose(manifest, architecture_code="mobilenet_v2")
    assert given.operating_point is None and given.reason == "architecture" and given.executed[:, 0].all()


def test_a_budget_ranks_points_by_validation_not_test(multi):
    """The test split is for reporting: where a point's validation figures rank it differently
    from its test figures, the budget takes the validation order; a bundle without validation
    figures falls back to the test ones."""
    manifest, _ = read_manifest(multi[0])
    assert choose(manifest, max_latency_ms=5).operating_point == "A"  # test: A 0.90 > B 0.85 > C 0.70
    validation = {"A": Validation(images=50, top1=0.80, mean_estimated_latency_ms=2.7),
                  "B": Validation(images=50, top1=0.86, mean_estimated_latency_ms=1.8),
                  "C": Validation(images=50, top1=0.70, mean_estimated_latency_ms=0.9)}
    ranked = manifest.model_copy(update={"controllers": [
        c.model_copy(update={"validation": validation[c.name]}) for c in manifest.controllers]})
    picked = choose(ranked, max_latency_ms=5)
    assert (picked.operating_point, picked.reason) == ("B", "budget")  # validation: B first
    assert choose(ranked, max_latency_ms=1.5).operating_point == "C"
    again = Manifest.model_validate(json.loads(ranked.model_dump_json()))
    assert again.controllers[1].validation.top1 == 0.86 and choose(again, max_latency_ms=5).operating_point == "B"


def test_a_served_budget_follows_validation_and_model_shows_both(multi, test_jpegs, tmp_path):
    """Over HTTP, on a copy of the bundle whose points' validation figures rank B above A (the test
    figures rank A first): the budget answers with B, and GET /model shows both figures."""
    import shutil

    bundle = tmp_path / "ranked"
    shutil.copytree(multi[0], bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    for point, top1 in zip(data["controllers"], (0.80, 0.86, 0.70)):
        point["validation"] = {"images": 50, "top1": top1, "mean_estimated_latency_ms": 1.0}
    (bundle / "manifest.json").write_text(json.dumps(data))
    srv = Server(bundle, tmp_path / "server.log")
    try:
        body = _post(srv, test_jpegs[0][1], max_latency_ms=5).json()
        assert body["operating_point"] == {"name": "B", "reason": "budget"}
        points = {p["name"]: p for p in httpx.get(srv.url + "/model").json()["controllers"]}
        assert points["A"]["validation"]["top1"] == 0.80 and points["A"]["evaluation"]["top1"] == 0.90
    finally:
        srv.stop()


def test_a_version_1_manifest_is_read_as_one_default_point(multi, tmp_path):
    import shutil

    shutil.copytree(multi[0], tmp_path / "b")
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    first = data["controllers"][0]
    v1 = {k: v for k, v in data.items() if k not in ("controllers", "default_controller", "frequent_architectures")}
    v1.update(schema_version=1, evaluation=first["evaluation"],
              controller={k: first[k] for k in ("file", "sha256", "latency_ms", "mflops", "params", "threshold")})
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(v1))
    manifest, _ = read_manifest(tmp_path / "b")
    assert manifest.schema_version == 3 and [c.name for c in manifest.controllers] == ["default"]
    assert manifest.controller().evaluation.top1 == first["evaluation"]["top1"]


@pytest.fixture(scope="module")
def multi_server(multi, tmp_path_factory):
    srv = Server(multi[0], tmp_path_factory.mktemp("multi-server") / "server.log")
    yield srv
    srv.stop()


def _post(srv, jpeg: bytes, **params) -> httpx.Response:
    return httpx.post(srv.url + "/classify", params=params, content=jpeg, headers={"content-type": "image/jpeg"},
                      timeout=30)


def test_http_selects_operating_points_and_overrides(multi_server, test_jpegs):
    jpeg = test_jpegs[0][1]
    body = _post(multi_server, jpeg).json()
    assert body["operating_point"] == {"name": "B", "reason": "default"}
    assert _post(multi_server, jpeg, operating_point="A").json()["operating_point"] == {"name": "A", "reason": "requested"}
    assert _post(multi_server, jpeg, max_latency_ms=1.5).json()["operating_point"] == {"name": "C", "reason": "budget"}
    fixed = _post(multi_server, jpeg, architecture="mobilenet_v2").json()
    assert fixed["operating_point"] == {"name": None, "reason": "architecture"}
    assert fixed["architecture"]["code"] == "1111"
    everything = _post(multi_server, jpeg, architecture="all").json()
    assert everything["architecture"]["code"] == "7777"
    explicit = _post(multi_server, jpeg, architecture="1031").json()
    assert explicit["architecture"]["code"] == "1131"  # cell 1 cannot be skipped: its first module runs
    # the estimate of a given architecture has no controller in it
    assert explicit["architecture"]["estimated_latency_ms"] < body["architecture"]["estimated_latency_ms"] + 1
    points = "instanas_operating_point_total"
    assert metric(multi_server.url, points, model="test", operating_point="A", reason="requested") == 1
    assert metric(multi_server.url, points, model="test", operating_point="", reason="architecture") == 3


@pytest.mark.parametrize("params,code", [
    ({"operating_point": "Z"}, "unknown_operating_point"),
    ({"architecture": "zzzz"}, "invalid_architecture"),
    ({"architecture": "12"}, "invalid_architecture"),
    ({"architecture": "1111", "operating_point": "A"}, "conflicting_options"),
    ({"operating_point": "A", "max_latency_ms": 2}, "conflicting_options"),
    ({"max_latency_ms": -1}, "invalid_request"),
])
def test_options_that_do_not_fit_get_422(multi_server, test_jpegs, params, code):
    response = _post(multi_server, test_jpegs[0][1], **params)
    assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_a_budget_is_a_finite_number_of_milliseconds(multi_server, test_jpegs, value):
    response = _post(multi_server, test_jpegs[0][1], max_latency_ms=value)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", response.text
    message = response.json()["error"]["message"]
    assert message.startswith("query.max_latency_ms: ") and ("finite" in message if value != "0" else "greater than 0" in message)


def test_a_static_bundle_has_no_operating_points(tmp_path, test_jpegs):
    export_test_bundle(tmp_path / "static", build_tiny_space(), with_controller=False)
    srv = Server(tmp_path / "static", tmp_path / "server.log")
    try:
        body = _post(srv, test_jpegs[0][1]).json()
        assert body["operating_point"] == {"name": None, "reason": "static"} and body["architecture"]["code"] == "1111"
        refused = _post(srv, test_jpegs[0][1], operating_point="A")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_operating_point"
    finally:
        srv.stop()


def test_governor_steps_to_faster_points_under_load_and_back(multi):
    manifest, _ = read_manifest(multi[0])  # default B (2 ms); C (1 ms) is faster; A (3 ms) is not on the ladder
    now = [0.0]
    governor = LoadGovernor(manifest, target_ms=10, cooldown_s=1.0, clock=lambda: now[0])
    assert governor.ladder == ["B", "C"] and governor.current() == ("B", "default")
    for _ in range(20):  # requests wait 50 ms for an executor
        governor.observe(0.050)
    assert governor.current() == ("C", "load")
    assert choose(manifest, governor=governor).reason == "load"
    assert choose(manifest, operating_point="A", governor=governor).operating_point == "A"  # asked for: kept
    for _ in range(50):  # the queue empties, but the cooldown holds the level
        governor.observe(0.0)
    assert governor.current() == ("C", "load")
    now[0] = 5.0
    governor.observe(0.0)
    assert governor.current() == ("B", "default")
    for _ in range(20):  # loaded again, then quiet for 10 s: the first quiet request resets the average
        now[0] += 1.0
        governor.observe(0.050)
    assert governor.current() == ("C", "load")
    now[0] += 10.0
    governor.observe(0.0)
    assert governor.queue_s < 1e-5 and governor.current() == ("B", "default")
    assert not LoadGovernor(manifest, target_ms=0).enabled


def test_requests_queued_behind_a_held_batch_move_the_default_to_a_faster_point_and_back(multi, test_jpegs):
    """In process, through the app's route, batcher and governor: requests really queue behind a batch
    held at the gate, their wait moves the default to the faster point, and a quiet spell (on a clock
    the test moves) brings it back."""
    gate = threading.Event()
    gate.set()
    # One executor, one request a batch; never on the loop's thread, where a held batch would hold the test.
    settings = Settings(model=multi[0], queue_target_ms=10, load_cooldown_s=1, max_concurrency=1, max_batch_size=1,
                        inline_max_bytes=0)
    app = create_app(settings, load_bundle(multi[0]), before_batch=lambda jobs: gate.wait(60))
    state = app.state.models.get()
    now = [0.0]  # the governor's clock: its averaging and cooldown; queue times stay real
    state.governor = LoadGovernor(state.manifest, settings.queue_target_ms, cooldown_s=settings.load_cooldown_s,
                                  clock=lambda: now[0])
    jpeg = test_jpegs[0][1]

    async def main():
        async def until(check) -> None:
            deadline = time.monotonic() + 30  # guards a hang only
            while not check():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.001)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            async def point() -> tuple[str, str, float]:
                body = (await client.post("/classify", content=jpeg, headers={"content-type": "image/jpeg"})).json()
                return body["operating_point"]["name"], body["operating_point"]["reason"], body["latency_ms"]["queue"]

            gate.clear()
            held = asyncio.ensure_future(point())
            await until(lambda: state.batcher.busy)  # its batch waits at the gate
            queued = [asyncio.ensure_future(point()) for _ in range(3)]
            await until(lambda: state.batcher.queued == 3)
            await asyncio.sleep(0.1)  # so they wait at least 100 ms, 10x the target (a slower machine: longer)
            gate.set()
            burst = await asyncio.gather(held, *queued)
            assert [p[:2] for p in burst] == [("B", "default")] * 4  # chosen when they arrived, before any wait
            assert all(p[2] >= 100 for p in burst[1:])
            assert state.governor.current() == ("C", "load")
            lone = [await point() for _ in range(5)]  # nothing queues now, but the 1 s cooldown holds the point
            assert [p[:2] for p in lone] == [("C", "load")] * 5 and all(p[2] == 0 for p in lone)
            now[0] += 60  # a quiet minute: the next wait observed replaces the average
            assert (await point())[:2] == ("C", "load")  # chosen before its own wait was observed
            assert (await point())[:2] == ("B", "default")

    try:
        asyncio.run(main())
    finally:
        gate.set()
        state.stop()


def test_http_moves_to_a_faster_point_while_requests_queue(multi, tmp_path, test_jpegs):
    """Through a real server: requests queued behind a held batch are answered by the faster point
    (`reason: load`), and lone requests bring back the default. Nothing here depends on how fast the
    machine is: the queue is made by holding the executor, not by hoping for contention."""
    target_s = 0.010
    srv = Server(multi[0], tmp_path / "server.log", gated=True, INSTANAS_QUEUE_TARGET_MS=str(target_s * 1e3),
                 INSTANAS_LOAD_COOLDOWN_S="0", INSTANAS_MAX_CONCURRENCY="1", INSTANAS_MAX_BATCH_SIZE="1")
    jpegs = [j for _, j in test_jpegs]
    try:
        with ThreadPoolExecutor(4) as pool:
            def burst() -> list[dict]:
                """One request held at the gate, three queued behind it for at least 100 ms (10x the target)."""
                srv.hold()
                first = pool.submit(_post, srv, jpegs[0])
                wait_until(lambda: srv.queued() == (1, 0), "the first batch to be held")
                rest = [pool.submit(_post, srv, j) for j in jpegs[1:4]]
                wait_until(lambda: srv.queued() == (1, 3), "three requests to queue")
                time.sleep(0.1)  # a lower bound on their wait: a slower machine only makes it longer
                srv.release()
                return [f.result().json() for f in (first, *rest)]

            loaded = burst()  # they chose on arrival, with nothing yet observed: the default
            assert [b["operating_point"] for b in loaded] == [{"name": "B", "reason": "default"}] * 4
            assert all(b["latency_ms"]["queue"] >= 100 for b in loaded[1:])
            queued = burst()  # the waits above moved the default: these queued requests get the faster point
            assert [b["operating_point"] for b in queued] == [{"name": "C", "reason": "load"}] * 4
        # Back to the default once nothing queues. The governor's average is at most the longest wait it
        # has seen, and a request to an idle server waits exactly 0 and takes at least a fifth of the
        # average away: below a quarter of the target within `limit` requests, however slow each one is.
        longest = max(b["latency_ms"]["queue"] for b in loaded + queued) / 1e3
        limit = math.ceil(math.log(longest / (target_s / 4)) / math.log(1 / 0.8)) + 1  # + the one chosen before
        answers = []
        while {"name": "B", "reason": "default"} not in answers:
            assert len(answers) <= limit, answers
            body = _post(srv, jpegs[0]).json()
            assert body["latency_ms"]["queue"] == 0
            answers.append(body["operating_point"])
        assert all(a == {"name": "C", "reason": "load"} for a in answers[:-1]), answers
        assert 'reason="load"' in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
