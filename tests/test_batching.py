"""Dynamic batching: batched rows equal unbatched rows, the batcher's policy (no wait when idle,
gather under load, hold only for arriving requests), and no request ever gets another's answer."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service import architecture, fused, imaging
from service.batching import Batcher
from service.bundle import load_bundle
from service.executor import Executor
from tests.conftest import Server, wait_until
from tests.helpers import export_test_bundle, three_points
from training.searchspace import build_search_space, build_tiny_space

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A tiny-space bundle with three operating points A (many modules), B (the default), C (few)."""
    space = build_tiny_space()
    out = tmp_path_factory.mktemp("multi")
    export_test_bundle(out, space, controllers=three_points(space), default_controller="B")
    return out


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    export_test_bundle(out, build_search_space(width_multiplier=0.25).model_copy(update={"combine": "sum"}))
    return out


def _mix(space, points: list[str | None], n: int, seed: int):
    """n rows of requests: a controller's choice (a name, or None for the default) or a given architecture."""
    rng = np.random.default_rng(seed)
    given = [architecture.mobilenet_v2(space), np.ones((space.num_cells, space.num_modules), bool),
             rng.random((space.num_cells, space.num_modules)) < 0.5]
    row_points, row_given = [], []
    for i in range(n):
        k = int(rng.integers(0, len(points) + len(given)))
        if k < len(points):
            row_points.append(points[k])
            row_given.append(None)
        else:
            row_points.append(None)
            row_given.append(given[k - len(points)])
    return row_points, row_given


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("which", ["multi", "paper"])
def test_batched_rows_equal_unbatched_rows(request, which, with_cache):
    loaded = load_bundle(request.getfixturevalue(which))
    space = loaded.manifest.search_space
    points = [None, *[c.name for c in loaded.manifest.controllers]]
    cache = fused.FusedCache(loaded, size=8, min_count=10**6) if with_cache else None  # warm-up builds only
    batched, alone = Executor(loaded, fused=cache), Executor(loaded)
    rng = np.random.default_rng(4)
    # per-image colour shifts, so the controllers choose differently for different images
    x = (rng.standard_normal((16, 3, space.input_size, space.input_size))
         + 2 * rng.standard_normal((16, 3, 1, 1))).astype(np.float32)
    row_points, row_given = _mix(space, points, 16, seed=5)
    if cache is not None:  # half of the architectures compiled, half not
        first = batched.run_batch(x, row_points, row_given)
        cache.start()
        cache.warm(sorted({architecture.encode(e) for e in first.executed})[::2])
        assert cache.wait_idle(60)
    try:
        result = batched.run_batch(x, row_points, row_given)
    finally:
        if cache is not None:
            cache.stop()
    codes = set()
    for i in range(16):
        if row_given[i] is not None:
            expected = alone.run(x[i : i + 1], executed=row_given[i][None])
        else:
            expected = alone.run(x[i : i + 1], operating_point=row_points[i])
        assert np.array_equal(result.executed[i], expected.executed[0]), i
        assert np.abs(result.logits[i] - expected.logits[0]).max() < TOLERANCE, i
        assert np.abs(result.probabilities[i] - expected.probabilities[0]).max() < TOLERANCE, i
        assert result.point(i) == expected.operating_point, i
        codes.add(architecture.encode(expected.executed[0]))
    assert len(codes) >= 3
    if cache is not None:
        assert 0 < result.fused_rows < 16


# --- the batcher's policy -----------------------------------------------------------------------------


def _batcher(process, **kw) -> Batcher:
    settings = {"workers": 1, "max_batch_size": 8, "max_batch_delay_s": 0.002}
    settings.update(kw)
    return Batcher(process, **settings)


class Clock:
    """The batcher's clock, moved only by the test: the waits it measures are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_server_runs_at_once_even_with_a_long_delay():
    async def main():
        # On a clock that never moves, a job held for the delay would never go: the timeout only guards that hang.
        batcher = _batcher(lambda jobs: [j.payload * 2 for j in jobs], max_batch_delay_s=5.0, clock=Clock())
        job = await asyncio.wait_for(batcher.run(21, expected=False), 30)
        batcher.close()
        return job

    job = asyncio.run(main())
    assert job.result == 42 and job.batch_size == 1
    assert job.batch_s == 0 and job.queue_s == 0


def test_an_idle_batcher_runs_an_accepted_job_on_the_loop_and_a_busy_one_on_its_threads():
    gate = threading.Event()
    ran_on: dict[int, str] = {}

    def process(jobs):
        for j in jobs:
            ran_on[j.payload] = threading.current_thread().name
            if j.payload == 1:
                gate.wait(10)
            if j.payload == 9:
                raise ValueError("boom")
        return [j.payload for j in jobs]

    async def main():
        batcher = _batcher(process, workers=2, inline=lambda job: job.payload != 1)
        assert (await batcher.run(0, expected=False)).result == 0  # idle: on the loop's thread
        busy = asyncio.ensure_future(batcher.run(1, expected=False))  # not accepted: a worker thread
        await asyncio.sleep(0.05)
        second = await batcher.run(2, expected=False)  # a worker is busy: the other thread
        gate.set()
        await busy
        assert batcher.idle
        with pytest.raises(ValueError, match="boom"):  # an inline crash reaches its request, as from a thread
            await batcher.run(9, expected=False)
        assert batcher.idle and batcher.free == 2
        batcher.close()
        return second

    loop_thread = threading.current_thread().name
    second = asyncio.run(main())
    assert second.result == 2
    assert ran_on[0] == loop_thread and ran_on[9] == loop_thread
    assert ran_on[1].startswith("instanas-executor") and ran_on[2].startswith("instanas-executor")


def test_jobs_queued_behind_a_busy_worker_form_batches_of_at_most_max_size():
    gate = threading.Event()
    batches: list[list[int]] = []

    def process(jobs):
        gate.wait(10)
        batches.append([j.payload for j in jobs])
        return [j.payload for j in jobs]

    clock = Clock()

    async def main():
        batcher = _batcher(process, max_batch_size=4, clock=clock)
        first = asyncio.ensure_future(batcher.run(0, expected=False))
        await asyncio.sleep(0)  # one turn of the loop: job 0 is handed to the worker, which waits at the gate
        rest = [asyncio.ensure_future(batcher.run(i, expected=False)) for i in range(1, 11)]
        await asyncio.sleep(0)
        assert batcher.busy and batcher.queued == 10
        clock.now = 0.5  # they wait half a second for the worker
        gate.set()
        jobs = await asyncio.gather(first, *rest)
        batcher.close()
        return jobs

    jobs = asyncio.run(main())
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [j.result for j in jobs] == list(range(11))  # each job got its own outcome
    assert [j.batch_size for j in jobs] == [1, 4, 4, 4, 4, 4, 4, 4, 4, 2, 2]
    # they waited for the worker, not for batching: each batch left as soon as the worker was free
    assert [j.queue_s for j in jobs] == [0.0] + [0.5] * 10
    assert all(j.batch_s == 0 for j in jobs)


def test_jobs_of_several_images_fill_batches_by_images_and_are_never_split():
    gate = threading.Event()
    batches: list[list[str]] = []

    def process(jobs):
        gate.wait(10)
        batches.append([j.payload for j in jobs])
        return [j.payload for j in jobs]

    async def main():
        batcher = _batcher(process, max_batch_size=4)
        first = asyncio.ensure_future(batcher.run("busy", expected=False))
        await asyncio.sleep(0.05)
        sizes = {"a": 2, "b": 1, "c": 2, "big": 6, "d": 1, "e": 3}
        rest = [asyncio.ensure_future(batcher.run(name, expected=False, size=n)) for name, n in sizes.items()]
        await asyncio.sleep(0.05)
        gate.set()
        jobs = await asyncio.gather(first, *rest)
        batcher.close()
        return jobs

    jobs = asyncio.run(main())
    # 2 + 1 fit in 4, then 2 (+ 6 would pass it), the 6-image job alone, then 1 + 3
    assert batches == [["busy"], ["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert [j.batch_size for j in jobs] == [1, 3, 3, 2, 6, 4, 4]  # images in the batch each ran in


def test_a_batch_waits_for_arriving_requests_but_never_past_the_delay():
    delay = 0.125  # a binary fraction, so the clock reaches the deadline exactly
    clock = Clock()

    async def main():
        batcher = _batcher(lambda jobs: [len(jobs)] * len(jobs), max_batch_delay_s=delay, clock=clock)
        batcher.expect()
        batcher.expect()
        first = asyncio.ensure_future(batcher.run("a"))
        # Held while another admitted request is still arriving: real time passes (the batcher's timer
        # fires and looks again), but not on the batcher's clock, so the delay has not run out.
        await asyncio.sleep(3 * delay)
        assert not first.done()
        clock.now = delay / 2
        second = await batcher.run("b")  # it arrives: the two go at once
        a = await first
        # now one arrives that never submits: the batch goes when the delay runs out on the clock
        batcher.expect()
        batcher.expect()
        lone = asyncio.ensure_future(batcher.run("c"))
        await asyncio.sleep(3 * delay)
        assert not lone.done()
        clock.now += delay
        lone = await asyncio.wait_for(lone, 30)  # the next look (a timer, at most `delay` away) sends it; 30: a hang
        batcher.cancel()
        batcher.close()
        return a, second, lone

    a, b, lone = asyncio.run(main())
    assert a.result == b.result == 2 and a.batch_size == 2
    assert a.batch_s == delay / 2 and a.queue_s == 0
    assert lone.result == 1 and lone.batch_s == delay and lone.queue_s == 0


def test_one_jobs_error_stays_with_it_and_a_crash_reaches_the_whole_batch():
    def process(jobs):
        if any(j.payload == "crash" for j in jobs):
            raise RuntimeError("boom")
        return [ValueError(j.payload) if j.payload == "bad" else j.payload for j in jobs]

    async def main():
        batcher = _batcher(process)
        out = await asyncio.gather(*[batcher.run(p, expected=False) for p in ("ok", "bad", "fine")],
                                   return_exceptions=True)
        crash = await asyncio.gather(batcher.run("crash", expected=False), return_exceptions=True)
        after = await batcher.run("later", expected=False)  # the worker is free again
        batcher.close()
        return out, crash, after

    out, crash, after = asyncio.run(main())
    assert out[0].result == "ok" and isinstance(out[1], ValueError) and out[2].result == "fine"
    assert isinstance(crash[0], RuntimeError) and after.result == "later"


# --- over real HTTP ----------------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_answer(multi, test_jpegs, tmp_path):
    """Distinct real images, several operating points and given architectures, sent at once to a
    real server that batches them: every response is its own image's unbatched result."""
    loaded = load_bundle(multi)
    manifest = loaded.manifest
    executor = Executor(loaded)
    pre = manifest.preprocessing
    options = [{}, {"operating_point": "A"}, {"operating_point": "C"}, {"architecture": "mobilenet_v2"},
               {"architecture": "all"}, {"architecture": "1031"}]
    requests = [(name, data, options[i % len(options)]) for i, (name, data) in enumerate(test_jpegs)]
    requests.append(("bad", b"not an image at all", {}))  # one bad body inside the batches
    # One worker, its first batch held at the gate until every request is queued behind it: then they
    # surely run in batches, however the client threads happen to be scheduled.
    srv = Server(multi, tmp_path / "server.log", gated=True, INSTANAS_MAX_CONCURRENCY="1",
                 INSTANAS_MAX_BATCH_SIZE="8")

    def send(item):
        _, data, params = item
        return httpx.post(srv.url + "/classify", params={**params, "top_k": 10}, content=data,
                          headers={"content-type": "image/jpeg"}, timeout=60)

    try:
        srv.hold()
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(send, item) for item in requests]
            wait_until(lambda: sum(srv.queued()) == len(requests), "every request held or queued")
            srv.release()
            responses = [f.result() for f in futures]
        metrics = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    bad = responses.pop()
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"
    codes, sizes = set(), []
    for (label, data, params), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        x = imaging.to_input(imaging.to_pixels(imaging.decode(data), pre.input_size), pre)[None]
        if "architecture" in params:
            from service.operating_points import choose

            expected = executor.run(x, executed=choose(manifest, architecture_code=params["architecture"]).executed[None])
        else:
            expected = executor.run(x, operating_point=params.get("operating_point"))
        assert body["architecture"]["code"] == architecture.encode(expected.executed[0]), label
        got = {s["index"]: s["probability"] for s in body["top_k"]}
        assert len(got) == 10
        assert max(abs(got[k] - float(expected.probabilities[0][k])) for k in got) < TOLERANCE, label
        assert body["prediction"]["index"] == int(np.argmax(expected.probabilities[0]))
        assert body["operating_point"]["name"] == (None if "architecture" in params
                                                   else params.get("operating_point", "B"))
        latency = body["latency_ms"]
        assert latency["batch"] >= 0 and 1 <= latency["batch_size"] <= 8
        assert latency["total"] >= latency["controller"] + latency["backbone"]
        codes.add(body["architecture"]["code"])
        sizes.append(latency["batch_size"])
    assert len(codes) >= 3
    assert max(sizes) > 1, sizes  # batching really happened
    # the histogram observed real batch sizes: their sum is the images classified, in fewer runs
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("instanas_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("instanas_batch_size_sum")))
    assert total == len(responses) and count < len(responses)


def test_a_full_server_refuses_with_503_and_keeps_serving(multi, test_jpegs, tmp_path):
    """Admission control survives batching: with every executor busy and the queue full, 503
    `overloaded` with Retry-After, before the body is read; the admitted requests are answered."""
    # One executor, held at the gate with the one request admitted; a queue of 0: every other is refused.
    srv = Server(multi, tmp_path / "server.log", gated=True, INSTANAS_MAX_CONCURRENCY="1", INSTANAS_MAX_QUEUE="0",
                 INSTANAS_MAX_BATCH_SIZE="1")
    jpeg = test_jpegs[0][1]

    def send(_=None):
        return httpx.post(srv.url + "/classify", params={"architecture": "all"}, content=jpeg,
                          headers={"content-type": "image/jpeg"}, timeout=60)

    try:
        srv.hold()
        with ThreadPoolExecutor(24) as pool:
            admitted = pool.submit(send)
            wait_until(lambda: srv.queued() == (1, 0), "the first request to be held")
            refused = list(pool.map(send, range(23)))  # answered while the executor is still held: at once
            srv.release()
            assert admitted.result().status_code == 200
        assert all(r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
                   and r.headers["retry-after"] == "1" for r in refused)
        text = httpx.get(srv.url + "/metrics").text
        assert 'instanas_rejections_total{reason="overloaded"} 23.0' in text
        assert "instanas_queue_depth 0.0" in text and "instanas_in_flight_requests 0.0" in text
        assert httpx.post(srv.url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200
    finally:
        srv.stop()


def test_only_a_small_lone_request_is_chosen_for_the_loop_thread(tiny_bundle, test_jpegs):
    import io

    from PIL import Image

    from service import classification
    from service.batching import Job
    from service.operating_points import Choice
    from service.settings import Settings
    from service.state import ServiceState

    state = ServiceState(Settings(model=tiny_bundle), load_bundle(tiny_bundle))
    inline = state.batcher.inline

    def job(*images) -> Job:
        return Job(classification.Request(None, Choice(None, "default"), 1, 0.0, images=images))

    flat = io.BytesIO()
    Image.new("RGB", (2000, 2000), (20, 40, 60)).save(flat, "PNG")  # 4 Mpixel in a few KiB
    assert len(flat.getvalue()) < 64 * 1024
    jpeg = test_jpegs[0][1]
    assert inline(job(jpeg)) and inline(job(b"not an image"))  # the decoder refuses it at once
    assert inline(job(np.zeros((3, 32, 32), np.float32)))
    assert not inline(job(np.zeros((3, 224, 224), np.float32)))  # 588 KiB of input
    decoded = classification.Request(np.zeros((3, 224, 224), np.float32), Choice(None, "default"), 1, 0.0, decode_s=1e-3)
    assert inline(Job(decoded))  # decoded on the loop (classification.decoded_on_loop): small
    assert not inline(job(flat.getvalue()))  # small in bytes, not in pixels
    small = io.BytesIO()
    Image.new("RGB", (600, 600), (20, 40, 60)).save(small, "PNG")
    assert inline(job(small.getvalue())) and not inline(job(small.getvalue(), small.getvalue(), small.getvalue()))
    assert not inline(job(jpeg + bytes(64 * 1024)))  # over INSTANAS_INLINE_MAX_BYTES
    state.metrics.requests_in_progress = lambda: 2
    assert not inline(job(jpeg))  # another request in progress: the threads
    off = ServiceState(Settings(model=tiny_bundle, inline_max_bytes=0), load_bundle(tiny_bundle))
    assert off.batcher.inline is None
    state.stop()
    off.stop()


def test_a_batch_holds_each_image_as_prepare_gives_it(tiny_bundle, test_jpegs):
    """classification.batch_of: pixels decoded on the loop are scaled and normalised with the rest of
    their batch, prepared inputs (the Open Inference Protocol's FP32 tensors) join it as they are."""
    from service import classification
    from service.settings import Settings
    from service.state import ServiceState

    state = ServiceState(Settings(model=tiny_bundle), load_bundle(tiny_bundle))
    try:
        jpegs = [data for _, data in test_jpegs[:3]]
        prepared = [classification.prepare(state, data) for data in jpegs]
        decoded = [classification.pixels(state, data) for data in jpegs]
        tensor = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
        for items, expected in (([decoded[0]], [prepared[0]]), (decoded, prepared),
                                ([decoded[0], tensor, decoded[2]], [prepared[0], tensor, prepared[2]]),
                                ([tensor], [tensor]), ([tensor, tensor], [tensor, tensor])):
            batch = classification.batch_of(state, items)
            assert batch.dtype == np.float32 and batch.shape == (len(items), 3, 32, 32)
            np.testing.assert_array_equal(batch, np.stack(expected))
    finally:
        state.stop()


def test_small_jpegs_are_decoded_on_the_loop_and_answer_as_the_workers_would(tiny_bundle, test_jpegs):
    """submit() decodes small plain JPEGs before queueing (classification.decoded_on_loop): the
    worker gets the prepared inputs, the answer is the same to the bit, the decode stage counts that
    time, and an image that does not decode is refused there with the announced request withdrawn.
    Larger images, progressive JPEGs (whose scans may repeat) and other formats are the workers'."""
    import asyncio
    import io
    import json

    from PIL import Image

    from service import classification, imaging
    from service.errors import ApiError
    from service.operating_points import Choice
    from service.settings import Settings
    from service.state import ServiceState

    jpeg = test_jpegs[0][1]
    decode_jpeg = imaging.simplejpeg.decode_jpeg

    def encoded(size: int, fmt: str, **options) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (size, size), (20, 40, 60)).save(out, fmt, **options)
        return out.getvalue()

    on = ServiceState(Settings(model=tiny_bundle), load_bundle(tiny_bundle))
    off = ServiceState(Settings(model=tiny_bundle, inline_max_bytes=0), load_bundle(tiny_bundle))  # never on the loop

    def request(body=None, images=()):
        return classification.Request(body, Choice(None, "default"), 3, 0.0, images=images)

    prepared = classification.decoded_on_loop(on, request(jpeg))  # pixels: the worker scales and normalises them
    assert prepared.body.dtype == np.uint8 and prepared.body.shape == (32, 32, 3)
    np.testing.assert_array_equal(classification.batch_of(on, [prepared.body])[0], classification.prepare(on, jpeg))
    read = []  # pixels() reads a plain JPEG of the input's size with libjpeg-turbo, as Pillow would
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imaging.simplejpeg, "decode_jpeg", lambda *a, **k: read.append(1) or decode_jpeg(*a, **k))
        np.testing.assert_array_equal(classification.pixels(on, jpeg), prepared.body)
        patch.setattr(imaging, "simplejpeg", None)
        np.testing.assert_array_equal(classification.pixels(on, jpeg), prepared.body)
    assert read == [1]
    assert prepared.decode_s > 0
    several = classification.decoded_on_loop(on, request(images=(jpeg, test_jpegs[1][1])))
    assert [x.shape for x in several.images] == [(32, 32, 3)] * 2 and several.body is None
    for untouched in (request(encoded(300, "JPEG")),  # 90,000 pixels
                      request(encoded(32, "JPEG", progressive=True)), request(encoded(32, "PNG")),
                      request(jpeg + bytes(64 * 1024)), request(images=(jpeg,) * 100),  # too many bytes
                      request(images=(jpeg, np.zeros((3, 32, 32), np.float32)))):
        assert classification.decoded_on_loop(on, untouched) is untouched
    assert classification.decoded_on_loop(off, request(jpeg)).body is jpeg

    queued = []

    async def answers(state, body):
        run = state.batcher.run

        async def spy(payload, **kwargs):
            queued.append(payload)
            return await run(payload, **kwargs)

        state.batcher.run = spy
        state.batcher.expect()
        try:
            return json.loads(await classification.submit(state, request(body), expected=True))
        finally:
            assert state.batcher.arriving == 0
            del state.batcher.run

    async def main():
        here, there = await answers(on, jpeg), await answers(off, jpeg)
        assert here["top_k"] == there["top_k"] and here["architecture"] == there["architecture"]
        assert isinstance(queued[0].body, np.ndarray) and queued[1].body is jpeg  # what each worker got
        assert here["latency_ms"]["decode"] >= round(queued[0].decode_s * 1e3, 4) > 0
        with pytest.raises(ApiError) as refused:  # its header reads, its data is cut short
            await answers(on, jpeg[:-100])
        assert refused.value.status == 400 and on.batcher.idle and len(queued) == 2  # refused on the loop

    asyncio.run(main())
    on.stop()
    off.stop()
