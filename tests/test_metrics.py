"""service/metrics.py: the (cell, module) counters a model holds back until /metrics is read."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ARCHITECTURES_HELD, Metrics


def executions(metrics: Metrics, text: bytes | None = None) -> dict[tuple[str, str, str], float]:
    text = (text if text is not None else metrics.exposition()).decode()
    return {(s.labels["model"], s.labels["cell"], s.labels["module"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "instanas_module_executions_total"}


def test_held_back_counts_are_exact_when_read_and_when_retired():
    metrics = Metrics()
    a, b = metrics.model("a", 3, 2), metrics.model("b", 3, 2)
    first = np.array([[1, 0], [1, 1], [0, 0]], bool)
    second = np.array([[0, 1], [0, 0], [1, 0]], bool)

    def observe(model, executed, times):
        for _ in range(times):
            model.observe_architecture(executed, 0.5, 10.0)

    threads = [threading.Thread(target=observe, args=(a, first, 500)) for _ in range(4)]
    for t in threads:
        t.start()
    observe(a, second, 7)
    observe(b, first, 2)
    for t in threads:
        t.join()
    got = executions(metrics)
    assert got[("a", "0", "0")] == got[("a", "1", "0")] == got[("a", "1", "1")] == 2000
    assert got[("a", "0", "1")] == got[("a", "2", "0")] == 7 and got[("a", "2", "1")] == 0
    assert got[("b", "0", "0")] == 2 and got[("b", "2", "0")] == 0
    # the histograms of the same images are observed at once, held back or not
    text = metrics.exposition().decode()
    assert 'instanas_architecture_modules_count{model="a"} 2007.0' in text
    # a model no longer served (a reload) adds what it held, and counts at once from then on
    observe(b, second, 3)
    metrics.retire(b)
    assert executions(metrics, metrics.exposition())[("b", "2", "0")] == 3
    observe(b, second, 1)
    assert b._held == {} and executions(metrics)[("b", "2", "0")] == 4


def test_architectures_held_back_are_bounded():
    metrics = Metrics()
    model = metrics.model("m", 13, 1)
    for i in range(ARCHITECTURES_HELD + 10):
        executed = np.array([[bit == "1"] for bit in f"{i:013b}"])
        model.observe_architecture(executed, 0.5, 10.0)
        assert len(model._held) < ARCHITECTURES_HELD
    got = executions(metrics)
    assert sum(got.values()) == sum(f"{i:013b}".count("1") for i in range(ARCHITECTURES_HELD + 10))


def test_gauges_of_work_under_way_are_read_when_metrics_are_read():
    from service.metrics import sample

    metrics = Metrics()
    metrics.executing(3)
    metrics.queue_moved(2)
    metrics.queue_moved(-1)
    metrics.bodies_held(500)
    metrics.bodies_held(200)
    text = metrics.exposition().decode()
    assert sample(text, "instanas_in_flight_requests") == 3 and sample(text, "instanas_queue_depth") == 1
    assert sample(text, "instanas_queue_depth_peak") == 2 and sample(text, "instanas_buffered_body_bytes") == 200
    assert sample(text, "instanas_buffered_body_bytes_peak") == 500
    metrics.executing(-3)
    assert sample(metrics.exposition().decode(), "instanas_in_flight_requests") == 0


def test_updates_on_the_event_loop_wait_for_the_response_and_are_in_every_read():
    """`ModelMetrics.later`: on the event loop's thread an update waits for the loop's next turn
    (the response of a request run inline goes out first), or for /metrics to be read, whichever
    comes first; in a worker thread it is made at once; and a loop that never turns holds a bounded
    number of them."""
    import asyncio

    from service.metrics import LATER_HELD, sample

    metrics = Metrics()
    model = metrics.model("m", 2, 2)

    def count() -> float:
        return sample(metrics.exposition().decode(), "instanas_batch_size_count", model="m")

    async def on_the_loop():
        model.later(model.batch_size.observe, 1)
        assert len(model._later) == 1  # not made yet: the response would go out first
        await asyncio.sleep(0)  # the loop's next turn
        assert not model._later
        model.later(model.batch_size.observe, 1)
        assert count() == 2  # a read makes what is held first
        for _ in range(3 * LATER_HELD):
            model.later(model.batch_size.observe, 1)
            assert len(model._later) < LATER_HELD
        assert count() == 2 + 3 * LATER_HELD

    asyncio.run(on_the_loop())
    worker = threading.Thread(target=model.later, args=(model.batch_size.observe, 1))
    worker.start()
    worker.join()
    assert not model._later and count() == 3 + 3 * LATER_HELD
