"""Readiness proves the bundle works (service/warmup.py), and hot reload (service/reload.py):
a bundle whose controller was swapped for another graph fails start-up with status 2 and says
which; POST /admin/reload and SIGHUP swap bundles under load with no failed request; a bad bundle
leaves the old one serving."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests import hostile as h
from tests.conftest import BIN, Server, wait_until
from tests.helpers import export_test_bundle, random_controller
from training.searchspace import build_tiny_space

JPEG = h.jpeg()


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory) -> Path:
    """Another tiny bundle: other weights, so another manifest sha256."""
    space = build_tiny_space()
    out = tmp_path_factory.mktemp("second") / "bundle"
    export_test_bundle(out, space, seed=7, controllers={"A": random_controller(space, 11)})
    data = json.loads((out / "manifest.json").read_text())
    data["default_controller"] = "A"
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def swap_controller(bundle: Path, with_file: str) -> None:
    """Replace controller A's graph with another file of the bundle, its hash updated: every sha256
    check passes, only running it can tell."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    controller = next(c for c in manifest["controllers"] if c["name"] == "A")
    shutil.copy(bundle / with_file, bundle / controller["file"])
    controller["sha256"] = hashlib.sha256((bundle / controller["file"]).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def serve_once(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "instanas-serve"), "--model", str(bundle), "--port", "0"], capture_output=True,
                          text=True, timeout=120)


def which_graph(bundle: Path, kind: str) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"head": manifest["head"]["file"], "block": manifest["blocks"][0]["file"],
            "stem": manifest["stem"]["file"]}[kind]


@pytest.mark.parametrize("kind", ["head", "block", "stem"])
def test_a_controller_swapped_for_another_graph_fails_start_up(tiny_bundle, tmp_path, kind):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    swap_controller(bundle, which_graph(bundle, kind))
    done = serve_once(bundle)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot serve the bundle" in done.stderr and "controller" in done.stderr
    assert "operating point A" in done.stderr, done.stderr[-2000:]


def test_a_controller_of_another_space_fails_start_up(tiny_bundle, tmp_path, second_bundle):
    """Another bundle's controller with a wrong output shape: a tiny space with one more module."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    from service.manifest import SearchSpace

    space = build_tiny_space()
    wider = SearchSpace.model_validate({**space.model_dump(), "cells": [
        {**c.model_dump(), "modules": [*c.model_dump()["modules"], c.model_dump()["modules"][0]]} for c in space.cells]})
    other = tmp_path / "wider"
    export_test_bundle(other, wider, controllers={"A": random_controller(wider, 5)})
    manifest = json.loads((other / "manifest.json").read_text())
    shutil.copy(other / manifest["controllers"][0]["file"], bundle / "swapped.onnx")
    swap_controller(bundle, "swapped.onnx")
    done = serve_once(bundle)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gives shape" in done.stderr and "the manifest implies" in done.stderr, done.stderr[-2000:]


def test_the_warm_up_runs_every_graph(tiny_bundle):
    from service import warmup
    from service.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    calls = []
    for name in ("stem", "head"):
        session = getattr(bundle, name)
        setattr(bundle, name, _Counting(session, calls, name))
    bundle.blocks = {k: _Counting(s, calls, k) for k, s in bundle.blocks.items()}
    bundle.controllers = {k: _Counting(s, calls, k) for k, s in bundle.controllers.items()}
    warmup.check_graphs(bundle)
    assert set(calls) == {"stem", "head", *bundle.blocks, *bundle.controllers}


def test_the_fused_warm_up_runs_and_is_checked_before_ready(tiny_bundle, tmp_path):
    from service import architecture
    from service.app import create_app
    from service.manifest import Manifest
    from service.settings import Settings

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    space = Manifest.model_validate(data).search_space
    import numpy as np

    codes = [architecture.encode(architecture.mobilenet_v2(space)),
             architecture.encode(np.ones((space.num_cells, space.num_modules), bool))]
    assert len(set(codes)) == 2
    data["frequent_architectures"] = [{"code": code, "share": 0.4} for code in codes]
    (bundle / "manifest.json").write_text(json.dumps(data))
    state = create_app(Settings(model=bundle)).state.models.get()
    assert sorted(state.fused.codes()) == sorted(architecture.encode(architecture.apply_empty_cell_rule(
        architecture.decode(c, space.num_cells, space.num_modules)[None], space)[0]) for c in codes)
    assert state.fused.stats.hits == 0 and state.fused.stats.misses == 0  # the checks count no traffic
    state.stop()


class _Counting:
    def __init__(self, session, calls, name):
        self.session, self.calls, self.name = session, calls, name

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, *args):
        self.calls.append(self.name)
        return self.session.run(*args)


class Load:
    """Clients classifying in a loop until stopped: every outcome and which bundle answered."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.stop_event = url, threading.Event()
        self.outcomes: list[tuple[object, str | None]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        self.by_client: dict[int, list] = {i: [] for i in range(clients)}

    def _run(self, index: int):
        with httpx.Client(timeout=60) as client:
            while not self.stop_event.is_set():
                try:
                    r = client.post(self.url + "/classify", content=JPEG, headers={"content-type": "image/jpeg"})
                    outcome = (r.status_code, r.json().get("model", {}).get("sha256") if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    outcome = (type(exc).__name__, None)
                with self.lock:
                    self.outcomes.append(outcome)
                    self.by_client[index].append(outcome[1])

    def mark(self) -> dict[int, int]:
        """How many answers each client has had so far (for `wait_each`)."""
        with self.lock:
            return {i: len(seen) for i, seen in self.by_client.items()}

    def wait_each(self, since: dict[int, int] | None = None, sha: str | None = None) -> None:
        """Until every client has had an answer since `since` (a `mark()`), from the bundle `sha` when given:
        each phase of a test gets traffic from every client, however slowly the machine serves it."""
        since = since or dict.fromkeys(self.by_client, 0)

        def check() -> bool:
            with self.lock:
                return all((seen[since[i]:] if sha is None else sha in seen[since[i]:])
                           for i, seen in self.by_client.items())

        wait_until(check, f"an answer for every client{'' if sha is None else ' from ' + sha[:12]}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


def test_reload_under_load_fails_no_request_and_a_bad_bundle_keeps_the_old(tiny_bundle, second_bundle, tmp_path):
    token = {"authorization": "Bearer reload-token"}
    srv = Server(tiny_bundle, tmp_path / "server.log", INSTANAS_API_TOKEN="reload-token", INSTANAS_LOG_FORMAT="text")
    bad = tmp_path / "bad"
    shutil.copytree(second_bundle, bad)
    swap_controller(bad, which_graph(bad, "head"))
    try:
        with Load(srv.url) as load:
            load.wait_each(sha=sha(tiny_bundle))
            first = httpx.post(srv.url + "/admin/reload", json={"path": str(second_bundle)}, headers=token, timeout=120)
            load.wait_each(sha=sha(second_bundle))
            refused = httpx.post(srv.url + "/admin/reload", json={"path": str(bad)}, headers=token, timeout=120)
            load.wait_each(load.mark(), sha(second_bundle))  # the refused reload changed nothing
            back = httpx.post(srv.url + "/admin/reload", json={"path": str(tiny_bundle)}, headers=token, timeout=120)
            load.wait_each(load.mark(), sha(tiny_bundle))
        assert first.status_code == 200, first.text
        assert first.json()["model"]["sha256"] == sha(second_bundle)
        assert first.json()["previous"]["sha256"] == sha(tiny_bundle)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_bundle"
        assert "the old one still serves" in refused.json()["error"]["message"]
        assert "controller" in refused.json()["error"]["message"]
        assert back.status_code == 200 and back.json()["previous"]["sha256"] == sha(second_bundle)

        statuses = [s for s, _ in load.outcomes]
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        answered_by = [m for _, m in load.outcomes]
        assert sha(tiny_bundle) in answered_by and sha(second_bundle) in answered_by
        # each client, whose requests follow one another, saw the first bundle, the second (the bad
        # one never answered), then the first again: a swap is atomic, never back and forth
        assert set(answered_by) == {sha(tiny_bundle), sha(second_bundle)}
        for seen in load.by_client.values():
            runs = [m for i, m in enumerate(seen) if i == 0 or m != seen[i - 1]]
            assert runs == [sha(tiny_bundle), sha(second_bundle), sha(tiny_bundle)], runs

        ready = httpx.get(srv.url + "/healthz/ready").json()
        assert ready["model"]["sha256"] == sha(tiny_bundle)
        metrics = httpx.get(srv.url + "/metrics", headers=token).text
        assert 'instanas_reloads_total{result="ok"} 2.0' in metrics
        assert 'instanas_reloads_total{result="error"} 1.0' in metrics
        assert f'sha256="{sha(second_bundle)}"' not in metrics  # the old bundle's info is gone
        assert httpx.get(srv.url + "/model", headers=token).json()["sha256"] == sha(tiny_bundle)
    finally:
        srv.stop()


def test_sighup_reloads_the_same_folder(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    srv = Server(bundle, tmp_path / "server.log", INSTANAS_LOG_FORMAT="text")
    try:
        with Load(srv.url, clients=2) as load:
            load.wait_each()
            srv.process.send_signal(signal.SIGHUP)
            deadline = time.time() + 60
            while "reloaded: now serving" not in srv.log.read_text():
                assert time.time() < deadline and srv.process.poll() is None, srv.log.read_text()[-2000:]
                time.sleep(0.2)
            load.wait_each(load.mark())  # and served after the swap
        assert load.outcomes and {s for s, _ in load.outcomes} == {200}
        # start-up's objects were frozen out of garbage collection, and the new bundle's are once the old retires
        deadline = time.time() + 30
        while srv.log.read_text().count("objects frozen out of garbage collection") < 2:
            assert time.time() < deadline, srv.log.read_text()[-2000:]
            time.sleep(0.2)
        # a bundle broken on disk: SIGHUP logs why and the old one keeps serving
        (bundle / "manifest.json").write_text("{ not json")
        srv.process.send_signal(signal.SIGHUP)
        deadline = time.time() + 60
        while "SIGHUP reload" not in srv.log.read_text():
            assert time.time() < deadline, srv.log.read_text()[-2000:]
            time.sleep(0.2)
        assert "not valid JSON" in srv.log.read_text()
        assert httpx.post(srv.url + "/classify", content=JPEG, headers={"content-type": "image/jpeg"}).status_code == 200
        assert httpx.get(srv.url + "/healthz/ready").status_code == 200
    finally:
        srv.stop()


def test_freeze_exempts_what_exists_and_still_collects_later_garbage():
    import gc
    import weakref

    from service import heap

    try:
        assert heap.freeze() > 1000 and gc.get_freeze_count() > 1000  # this test process's modules, at least (an exact
        # match would race: a frozen object freed by reference counting leaves the count at once)

        class Node:
            pass

        node = Node()
        node.me = node  # a cycle: only the collector frees it
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_a_reload_frees_the_retired_models(tiny_bundle, second_bundle):
    """Start-up's objects are frozen out of garbage collection: the retired models, which hold
    reference cycles, must still be collected once a reload has stopped them."""
    import asyncio
    import gc
    import weakref

    from service import reload
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model=tiny_bundle))
    gc.freeze()  # as a ready server has done
    old = weakref.ref(app.state.models.get())

    async def swap() -> None:
        await reload.reload(app, str(second_bundle))
        await asyncio.gather(*list(app.state.reload_tasks))

    try:
        asyncio.run(swap())
        assert old() is None
        assert app.state.models.get().manifest.name == "test"
    finally:
        app.state.models.get().stop()
        gc.unfreeze()
