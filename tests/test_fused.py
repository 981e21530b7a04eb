"""Fused hot paths: one composed graph per architecture gives the per-block path's logits; the
cache admits, rate-limits, evicts and warms up as documented; the served counters move."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from service import architecture, fused
from service.bundle import load_bundle
from service.executor import Executor
from service.metrics import Metrics
from tests.conftest import Server, metric
from tests.helpers import export_test_bundle
from training.searchspace import build_search_space, build_tiny_space

TOLERANCE = 1e-5


def _paper():
    return build_search_space(width_multiplier=0.25)


SPACES = {
    "tiny-mean": build_tiny_space,
    "tiny-sum": lambda: build_tiny_space().model_copy(update={"combine": "sum"}),
    "paper-17x5-w0.25-mean": _paper,
    "paper-17x5-w0.25-sum": lambda: _paper().model_copy(update={"combine": "sum"}),
}


@pytest.fixture(scope="module", params=list(SPACES))
def bundle(request, tmp_path_factory):
    space = SPACES[request.param]()
    out = tmp_path_factory.mktemp(request.param)
    export_test_bundle(out, space)
    loaded = load_bundle(out)
    assert loaded.manifest.search_space.combine == space.combine
    return loaded


def architectures(space, seed: int = 0) -> dict[str, np.ndarray]:
    """Named (cells, modules) architectures, empty-cell rule applied: edge cases and random ones."""
    rng = np.random.default_rng(seed)
    shape = (space.num_cells, space.num_modules)
    mixed = rng.random(shape) < 0.5
    mixed[0] = False  # an empty cell
    mixed[-1] = True  # an all-module cell
    mixed[len(space.cells) // 2] = True
    raw = {
        "every cell empty": np.zeros(shape, bool),
        "every module everywhere": np.ones(shape, bool),
        "mobilenet_v2": architecture.mobilenet_v2(space),
        "mixed": mixed,
        "random 1": rng.random(shape) < 0.3,
        "random 2": rng.random(shape) < 0.7,
        "one module each, last": np.eye(space.num_modules, dtype=bool)[np.full(space.num_cells, space.num_modules - 1)],
    }
    return {k: architecture.apply_empty_cell_rule(v[None], space)[0] for k, v in raw.items()}


def test_fused_graph_equals_the_per_block_path(bundle):
    space = bundle.manifest.search_space
    executor = Executor(bundle)  # per-block only
    library = fused.GraphLibrary(bundle)
    x = np.random.default_rng(1).standard_normal((3, 3, space.input_size, space.input_size)).astype(np.float32)
    outputs = {}
    for name, executed in architectures(space).items():
        graph = fused.build(library, space, executed)
        assert graph.code == architecture.encode(executed)
        expected = executor.run(x, executed=np.repeat(executed[None], len(x), 0)).logits
        got = graph(x)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < TOLERANCE, name
        # test bundles' logits are small (about 0.01-0.1): hold the paths to rounding relative to them too
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), name
        assert np.abs(graph(x[:1]) - expected[:1]).max() < TOLERANCE, name  # dynamic batch
        outputs[name] = got
    # the architectures really differ (a fused graph that ignored the architecture would pass the above
    # only if the per-block path ignored it too)
    assert np.abs(outputs["every cell empty"] - outputs["every module everywhere"]).max() > 1e-3


def test_a_pooling_graph_reads_the_full_input(bundle):
    """A network at a lower resolution: its fused graph (pool 2) reads the bundle's input and equals
    the per-block path on that input average-pooled, as service.cascade.pool computes it."""
    from service.cascade import pool

    space = bundle.manifest.search_space
    executor = Executor(bundle)
    executed = architectures(space)["random 1"]
    graph = fused.build(fused.GraphLibrary(bundle), space, executed, pool=2)
    x = np.random.default_rng(2).standard_normal((2, 3, 2 * space.input_size, 2 * space.input_size)).astype(np.float32)
    expected = executor.per_block(pool(x, space.input_size), np.repeat(executed[None], len(x), 0))
    assert graph.session.get_inputs()[0].shape[2:] == [2 * space.input_size] * 2
    assert np.abs(graph(x) - expected).max() < TOLERANCE


@pytest.mark.parametrize("modules", [1, 3, 5, 6, 11])
def test_batch_codes_equal_row_codes(modules):
    executed = np.random.default_rng(modules).random((9, 17, modules)) < 0.5
    executed[0] = False
    executed[1] = True
    codes = architecture.encode_many(executed)
    assert codes == [architecture.encode(row) for row in executed]
    assert all(np.array_equal(architecture.decode(c, 17, modules), row) for c, row in zip(codes, executed))


def test_mean_scales_are_only_where_several_modules_run(bundle):
    space = bundle.manifest.search_space
    model = fused.compose(fused.GraphLibrary(bundle), space, architectures(space)["every module everywhere"])
    scales = [i for i in model.graph.initializer if i.name.endswith("/scale")]
    assert len(scales) == (space.num_cells if space.combine == "mean" else 0)
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)


def test_executor_with_cache_serves_mixed_batches_like_the_per_block_path(bundle):
    space = bundle.manifest.search_space
    plain = Executor(bundle)
    cache = fused.FusedCache(bundle, size=8, min_count=1, builds_per_minute=1000)
    executor = Executor(bundle, fused=cache)
    archs = list(architectures(space).values())
    cache.start()
    try:
        cache.warm([architecture.encode(a) for a in archs[:3]])  # three of them cached
        assert cache.wait_idle(60) and len(cache) == 3
        rng = np.random.default_rng(2)
        pick = rng.integers(0, len(archs), 12)
        pick[:3] = [0, 0, 4]  # cached and uncached rows, one architecture on several rows
        executed = np.stack([archs[i] for i in pick])
        x = rng.standard_normal((12, 3, space.input_size, space.input_size)).astype(np.float32)
        result = executor.run(x, executed=executed)
        expected = plain.run(x, executed=executed)
        assert np.array_equal(result.executed, expected.executed)
        assert np.abs(result.logits - expected.logits).max() < TOLERANCE
        assert result.fused_rows == int(np.isin(pick, [0, 1, 2]).sum()) > 0
        # a batch of one cached architecture runs its fused graph alone
        one = executor.run(x[:4], executed=np.repeat(archs[1][None], 4, 0))
        assert one.fused_rows == 4
        assert np.abs(one.logits - plain.run(x[:4], executed=np.repeat(archs[1][None], 4, 0)).logits).max() < TOLERANCE
    finally:
        cache.stop()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-cache")
    export_test_bundle(out, build_tiny_space())
    return load_bundle(out)


class Clock:
    """A monotonic clock the test moves by hand (the builder's rate limit reads it)."""

    def __init__(self):
        self.now, self._lock = 1000.0, threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def _codes(space, n: int) -> list[str]:
    """n distinct valid architecture codes of the space."""
    out = []
    for k in range(1, 1 << space.num_modules):
        matrix = np.zeros((space.num_cells, space.num_modules), bool)
        matrix[:] = [(k >> m) & 1 for m in range(space.num_modules)]
        out.append(architecture.encode(architecture.apply_empty_cell_rule(matrix[None], space)[0]))
    assert len(set(out)) >= n
    return out[:n]


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_cache_admits_after_min_count_rate_limits_and_evicts(tiny_bundle):
    space = tiny_bundle.manifest.search_space
    clock = Clock()
    metrics = Metrics().model("tiny", space.num_cells, space.num_modules)
    cache = fused.FusedCache(tiny_bundle, size=2, min_count=3, builds_per_minute=2, metrics=metrics, clock=clock)
    a, b, c = _codes(space, 3)
    cache.start()
    try:
        # seen twice: not admitted, nothing built
        assert cache.get(a) is None and cache.get(a) is None
        assert cache.wait_idle(5) and len(cache) == 0
        # the third sighting admits it; the build happens off the request path
        assert cache.get(a) is None
        assert cache.wait_idle(30) and cache.codes() == [a]
        assert cache.get(a) is not None and cache.stats.hits == 1 and cache.stats.misses == 3
        # a batch of 3 images counts 3 sightings at once
        assert cache.get(b, images=3) is None
        assert cache.wait_idle(30) and set(cache.codes()) == {a, b}
        # two builds this minute: the third waits for the clock to move
        assert cache.get(c, images=3) is None
        # Time for a build that a broken limit would let by. Not a bound: on the frozen clock a working
        # limit never lets it by, so no machine is too slow for this to pass.
        time.sleep(0.3)
        assert c not in cache.codes() and cache.stats.builds == 2
        clock.advance(61)
        assert cache.wait_idle(30) and c in cache.codes()
        # size 2: the least recently used (a: b was built after a's last use) was evicted
        assert set(cache.codes()) == {b, c} and cache.stats.evictions == 1
        assert metrics.fused_cache_size._value.get() == 2
        assert metrics.fused_evictions._value.get() == 1
        assert metrics.fused_builds.labels("ok")._value.get() == 3
        assert metrics.fused_hits._value.get() == 1 and metrics.fused_misses._value.get() == 9
    finally:
        cache.stop()


def test_cache_warm_up_is_not_rate_limited_and_size_zero_disables(tiny_bundle):
    space = tiny_bundle.manifest.search_space
    codes = _codes(space, 4)
    cache = fused.FusedCache(tiny_bundle, size=3, min_count=100, builds_per_minute=0, clock=Clock())
    cache.start()
    try:
        assert cache.warm(codes + ["not a code"]) == 3  # the first `size` of them
        assert cache.wait_idle(30) and cache.codes() == codes[:3]
        assert cache.get(codes[0]) is not None
        assert cache.get(codes[3], images=1000) is None  # admitted, but no build is allowed a minute
        time.sleep(0.2)  # time for a build that should not happen (as above: it never does, on any machine)
        assert codes[3] not in cache.codes()
    finally:
        cache.stop()
    disabled = fused.FusedCache(tiny_bundle, size=0)
    assert not disabled.enabled and disabled.warm(codes) == 0 and disabled.get(codes[0], executed=None) is None
    executor = Executor(tiny_bundle, fused=disabled)
    x = np.zeros((2, 3, space.input_size, space.input_size), np.float32)
    assert executor.run(x).fused_rows == 0




def test_served_fused_path_agrees_and_the_hit_counter_rises(tmp_path, test_jpegs):
    """Over real HTTP: warm-up from the manifest's frequent architectures, admission of an
    explicit architecture after INSTANAS_FUSED_MIN_COUNT images, the same answers either way."""
    space = build_tiny_space()
    export_test_bundle(tmp_path / "b", space, seed=5)
    warm = architecture.encode(architecture.apply_empty_cell_rule(np.ones((1, space.num_cells, space.num_modules),
                                                                           bool), space)[0])
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    data["frequent_architectures"] = [{"code": warm, "share": 0.5}]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(data))
    srv = Server(tmp_path / "b", tmp_path / "server.log", INSTANAS_FUSED_MIN_COUNT="2", INSTANAS_FUSED_CACHE_SIZE="4")
    try:
        def post(jpeg: bytes, code: str) -> dict:
            response = httpx.post(srv.url + "/classify", params={"architecture": code, "top_k": 10}, content=jpeg,
                                  headers={"content-type": "image/jpeg"}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        _wait(lambda: metric(srv.url, "instanas_fused_cache_size") >= 1)  # the warm-up
        hits = metric(srv.url, "instanas_fused_cache_hits_total")
        jpeg = test_jpegs[0][1]
        body = post(jpeg, warm)
        assert body["architecture"]["code"] == warm
        assert metric(srv.url, "instanas_fused_cache_hits_total") == hits + 1

        code = "1111"  # MobileNetV2: not warmed up; per-block until seen twice, then built in the background
        misses = metric(srv.url, "instanas_fused_cache_misses_total")
        per_block = [post(data, code) for _, data in test_jpegs[:2]]
        assert metric(srv.url, "instanas_fused_cache_misses_total") == misses + 2
        _wait(lambda: metric(srv.url, "instanas_fused_cache_size") >= 2)
        assert metric(srv.url, "instanas_fused_builds_total", result="ok") == 2
        hits = metric(srv.url, "instanas_fused_cache_hits_total")
        fused_bodies = [post(data, code) for _, data in test_jpegs[:2]]
        assert metric(srv.url, "instanas_fused_cache_hits_total") == hits + 2
        for a, b in zip(per_block, fused_bodies):
            assert a["architecture"] == b["architecture"]
            pa = {s["index"]: s["probability"] for s in a["top_k"]}
            pb = {s["index"]: s["probability"] for s in b["top_k"]}
            assert pa.keys() == pb.keys() and max(abs(pa[k] - pb[k]) for k in pa) < TOLERANCE
        assert metric(srv.url, "instanas_fused_build_duration_seconds_count") == 2
    finally:
        srv.stop()
