"""Prometheus metrics of the service.

`Metrics` holds the process's metric families on a registry of its own (one per app): what
the process does (requests, connections, queue, rejections, reloads) and, labelled `model`,
what each served model does (stages, architectures, modules, batches, fused cache, operating
points). `Metrics.model(name, ...)` gives one model's view, `ModelMetrics`, with the same
attribute names and the `model` label already filled in.

With several worker processes (`INSTANAS_WORKERS`, service/workers.py) the values live in
prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor
before a worker imports prometheus_client) and `/metrics` adds them up across the workers
(`exposition()`); every gauge says how (`multiprocess_mode`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def multiprocess_dir() -> str | None:
    """The folder of multiprocess values when several workers serve, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(registry: CollectorRegistry) -> bytes:
    """The text `/metrics` answers: this process's registry, or every worker's values added up
    (`Metrics.exposition` first adds in what its models hold back)."""
    if multiprocess_dir():
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry)


def sample(text: str, name: str, /, **labels: str) -> float:
    """The value of `name` (a counter's `..._total`, a histogram's `..._count`) in exposition `text`,
    summed over the series whose labels include `labels` (e.g. every model's); 0 when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        # --- the process ---------------------------------------------------------------------------------
        self.workers = Gauge("instanas_workers", "Server processes serving: 1 each (INSTANAS_WORKERS).", registry=r,
                             multiprocess_mode="livesum")
        self.workers.set(1)
        self.requests = Counter("instanas_requests_total", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("instanas_request_duration_seconds", "Request handling time.",
                                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("instanas_in_flight_requests", "Classifications being executed now.", registry=r,
                               multiprocess_mode="livesum")
        self.queue_depth = Gauge("instanas_queue_depth", "Classifications waiting for an executor.", registry=r,
                                 multiprocess_mode="livesum")
        self.queue_depth_peak = Gauge("instanas_queue_depth_peak",
                                      "The highest instanas_queue_depth since the process started "
                                      "(with several workers: the highest of one worker).", registry=r,
                                      multiprocess_mode="livemax")
        self._queued = self._queue_peak = self._bodies = self._bodies_peak = self._in_flight = 0
        self.active_requests = 0  # HTTP requests in the app now (service/envelope.py)
        self._request_children: dict[tuple[str, int], tuple] = {}  # (endpoint, status) -> (count, duration) children
        # Requests in progress, for the inline path (service/classification.py): the server replaces this with
        # its count of connections whose request is parsed (service/server.py), which also sees requests whose
        # handler has not started yet.
        self.requests_in_progress = lambda: self.active_requests
        self.buffered_bytes = Gauge("instanas_buffered_body_bytes",
                                    "Request body bytes held now (reserved by requests being read or classified).",
                                    registry=r, multiprocess_mode="livesum")
        self.buffered_bytes_peak = Gauge("instanas_buffered_body_bytes_peak",
                                         "The highest instanas_buffered_body_bytes since the process started "
                                         "(with several workers: the highest of one worker).", registry=r,
                                         multiprocess_mode="livemax")
        self.open_connections = Gauge("instanas_open_connections", "Client connections open now.", registry=r,
                                      multiprocess_mode="livesum")
        self.connections_closed = Counter("instanas_connections_closed_total",
                                          "Connections closed by the connection limit: evicted (the longest idle, "
                                          "for a new one) or refused (503, every other connection busy).",
                                          ["reason"], registry=r)
        self.reloads = Counter("instanas_reloads_total", "Model repository reloads, by result (ok, error); with "
                               "several workers, each worker's reload counts.",
                               ["result"], registry=r)
        self.rejections = Counter("instanas_rejections_total", "Requests refused, by reason.", ["reason"], registry=r)
        self.model_info = Gauge("instanas_model_info", "The served bundles (value 1), one series each.",
                                ["name", "version", "sha256"], registry=r, multiprocess_mode="livemax")
        # Gauges of what is under way now, read when /metrics is read; with several workers, whose values other
        # processes read from files, set at every change instead (`_live` False).
        self._live = multiprocess_dir() is None
        if self._live:
            self.queue_depth.set_function(lambda: float(self._queued))
            self.buffered_bytes.set_function(lambda: float(self._bodies))
            self.in_flight.set_function(lambda: float(self._in_flight))
        for result in ("ok", "error"):
            self.reloads.labels(result)
        for reason in ("evicted", "refused"):
            self.connections_closed.labels(reason)
        # --- each served model (label `model`, first) -------------------------------------------------------
        self.stage_duration = Histogram("instanas_stage_duration_seconds",
                                        "Time per stage of a classification: decode, queue (every executor busy), "
                                        "controller, backbone. Batching holds: instanas_batch_wait_seconds.",
                                        ["model", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.architecture_latency = Histogram("instanas_architecture_estimated_latency_seconds",
                                              "Estimated latency of the architecture chosen for each image.",
                                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.architecture_mflops = Histogram("instanas_architecture_mflops",
                                             "MFLOPs of the architecture chosen for each image.", ["model"],
                                             buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.architecture_modules = Histogram("instanas_architecture_modules", "Modules executed for each image.",
                                              ["model"], buckets=tuple(range(0, 17 * 5 + 4, 4)), registry=r)
        self.module_executions = Counter("instanas_module_executions_total",
                                         "Images that ran each (cell, module) block.", ["model", "cell", "module"],
                                         registry=r)
        self.batch_size = Histogram("instanas_batch_size", "Images per executor run (a batch gathered across requests).",
                                    ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.batch_wait = Histogram("instanas_batch_wait_seconds",
                                    "Time a classification was held, with an executor free, to gather a batch.",
                                    ["model"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01,
                                                        0.025), registry=r)
        # Fused hot paths (service/fused.py): images served by a compiled whole-architecture graph or not.
        self.fused_hits = Counter("instanas_fused_cache_hits_total",
                                  "Images whose architecture ran as one fused graph from the cache.", ["model"],
                                  registry=r)
        self.fused_misses = Counter("instanas_fused_cache_misses_total",
                                    "Images whose architecture had no fused graph ready (ran block by block).",
                                    ["model"], registry=r)
        self.fused_cache_size = Gauge("instanas_fused_cache_size", "Fused architecture graphs held now.", ["model"],
                                      registry=r, multiprocess_mode="livesum")
        self.fused_builds = Counter("instanas_fused_builds_total", "Fused graphs compiled, by result (ok, error).",
                                    ["model", "result"], registry=r)
        self.fused_build_duration = Histogram("instanas_fused_build_duration_seconds",
                                              "Time to compose and compile one fused graph (off the request path).",
                                              ["model"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                                                  5.0), registry=r)
        self.fused_evictions = Counter("instanas_fused_cache_evictions_total",
                                       "Fused graphs dropped from the cache (least recently used).", ["model"],
                                       registry=r)
        self.operating_points = Counter("instanas_operating_point_total",
                                        "Images by the operating point that chose their architecture, and why.",
                                        ["model", "operating_point", "reason"], registry=r)
        self.resolutions = Counter("instanas_resolution_total",
                                   "Images by the input resolution of the network that answered them.",
                                   ["model", "resolution"], registry=r)
        self.escalations = Counter("instanas_escalations_total",
                                   "Images a cascade operating point sent past its first stage.",
                                   ["model", "operating_point"], registry=r)

        self._models: list[ModelMetrics] = []  # the models served: what they hold back is added when read

    def model(self, name: str, num_cells: int, num_modules: int) -> ModelMetrics:
        """The metrics of the model served as `name` (its (cell, module) counters exported at 0 from the start)."""
        model = ModelMetrics(self, name, num_cells, num_modules)
        self._models.append(model)
        return model

    def retire(self, model: ModelMetrics) -> None:
        """A model no longer served: what it held back is counted, and it holds nothing back from now on."""
        model.deferred = False
        model.run_later()
        model.flush()
        if model in self._models:
            self._models.remove(model)

    def exposition(self) -> bytes:
        """What `/metrics` answers, every model's held-back counts and updates included."""
        for model in list(self._models):
            model.run_later()
            model.flush()
        return exposition(self.registry)

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        """An HTTP request answered: instanas_requests_total and instanas_request_duration_seconds."""
        children = self._request_children.get((endpoint, status))
        if children is None:  # looked up once per series (endpoints are the routes' paths, statuses few)
            children = self._request_children[endpoint, status] = (self.requests.labels(endpoint, str(status)),
                                                                   self.request_duration.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def executing(self, delta: int) -> None:
        """Classifications began (+) or ended (-) in an executor: instanas_in_flight_requests. On the loop."""
        self._in_flight += delta
        if not self._live:
            self.in_flight.set(self._in_flight)

    def queue_moved(self, delta: int) -> None:
        """Jobs entered (+) or left (-) a batcher's queue: the depth and its peak. On the loop."""
        self._queued += delta
        if not self._live:
            self.queue_depth.set(self._queued)
        if self._queued > self._queue_peak:
            self._queue_peak = self._queued
            self.queue_depth_peak.set(self._queued)

    def bodies_held(self, used: int) -> None:
        """Request body bytes reserved now (service.limits.ByteBudget): the gauge and its peak. On the loop."""
        self._bodies = used
        if not self._live:
            self.buffered_bytes.set(used)
        if used > self._bodies_peak:
            self._bodies_peak = used
            self.buffered_bytes_peak.set(used)

    def served(self, name: str, version: str, sha256: str) -> None:
        self.model_info.labels(name, version, sha256).set(1)

    def unserved(self, name: str, version: str, sha256: str) -> None:
        """A bundle no longer served (a reload replaced or dropped it)."""
        self.model_info.labels(name, version, sha256).set(0)  # multiprocess files keep a removed series' last value
        if multiprocess_dir():
            return  # prometheus_client cannot remove a series there (and warns); 0 is what it reports
        try:
            self.model_info.remove(name, version, sha256)
        except KeyError:
            pass


class _Bound:
    """One metric family with labels besides `model`, seen from one model: `labels(...)` gives the
    model's series. Each series' child is looked up once and kept: prometheus_client's `labels()`
    validates and locks on every call, a dozen times an image."""

    def __init__(self, family, model: str):
        self._family, self._model = family, model
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._family.labels(self._model, *values)
        return child


_PER_MODEL = ("stage_duration", "architecture_latency", "architecture_mflops", "architecture_modules",
              "module_executions", "batch_size", "batch_wait", "fused_hits", "fused_misses", "fused_cache_size",
              "fused_builds", "fused_build_duration", "fused_evictions", "operating_points", "resolutions",
              "escalations")


class ModelMetrics:
    """The metrics of one served model: its own families bound to its name; the process's
    (in_flight, queue_moved, rejections...) reached through it as they are."""

    def __init__(self, process: Metrics, name: str, num_cells: int, num_modules: int):
        self.process, self.name = process, name
        for family in _PER_MODEL:
            parent = getattr(process, family)
            # a family labelled by model alone is its one child (each call reaches it at once); others a _Bound
            setattr(self, family, parent.labels(name) if tuple(parent._labelnames) == ("model",) else _Bound(parent, name))
        self._executions = [[self.module_executions.labels(str(c), str(m)) for m in range(num_modules)]
                            for c in range(num_cells)]
        self._by_architecture: dict[bytes, list] = {}  # an architecture's (cell, module) children, by its matrix
        # Images by architecture (its matrix) not yet added to the (cell, module) counters: one dict update an
        # image instead of a counter increment per module that ran. Added when /metrics is read (`flush`); with
        # several workers, whose values other processes read from files, at once.
        self.deferred = multiprocess_dir() is None
        self._held: dict[bytes, list] = {}  # matrix bytes -> [images, matrix]
        self._lock = threading.Lock()  # executor threads observe while /metrics flushes
        self._later: deque = deque()  # (function, arguments) of updates made after the response (`later`)
        self._later_scheduled = False
        for result in ("ok", "error"):
            self.fused_builds.labels(result)
        for family in ("fused_hits", "fused_misses", "fused_evictions", "fused_cache_size"):
            getattr(process, family).labels(name)

    def __getattr__(self, name: str):
        return getattr(self.process, name)

    def later(self, update, *args) -> None:
        """Make the metric update `update(*args)`, one no response waits for: at once in a worker
        thread; on the event loop's thread (a request run there inline, service/batching.py), once
        the loop's current turn is over, so after the response is sent, or when /metrics is read
        (`Metrics.exposition`), whichever comes first."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            update(*args)
            return
        self._later.append((update, args))
        if len(self._later) >= LATER_HELD:  # a loop that never turns (a caller that never yields) holds no more
            self.run_later()
        elif not self._later_scheduled:
            self._later_scheduled = True
            loop.call_soon(self.run_later)

    def run_later(self) -> None:
        """Make the updates `later` holds."""
        self._later_scheduled = False
        while self._later:
            update, args = self._later.popleft()
            update(*args)

    def observe_architecture(self, executed: np.ndarray, latency_ms: float, mflops: float) -> None:
        """One image's architecture: (cells, modules) boolean of what ran."""
        key = executed.tobytes()
        if self.deferred:
            with self._lock:
                held = self._held.get(key)
                if held is None:
                    held = self._held[key] = [0, executed]
                held[0] += 1
                full = len(self._held) >= ARCHITECTURES_HELD
            # full: a bound on what clients sending architecture codes can make it hold; no longer deferred:
            # retired (Metrics.retire) meanwhile, and nothing would read this count
            if full or not self.deferred:
                self.flush()
        else:
            for child in self._children(key, executed):
                child.inc()
        self.architecture_latency.observe(latency_ms / 1e3)
        self.architecture_mflops.observe(mflops)
        self.architecture_modules.observe(int(executed.sum()))

    def flush(self) -> None:
        """Add the images held back by architecture to the (cell, module) counters."""
        with self._lock:
            held, self._held = self._held, {}
        for key, (images, executed) in held.items():
            for child in self._children(key, executed):
                child.inc(images)

    def _children(self, key: bytes, executed: np.ndarray) -> list:
        """The (cell, module) counters of the modules that ran in `executed` (`key`: its bytes)."""
        children = self._by_architecture.get(key)
        if children is None:
            rows = self._executions
            children = [rows[c][m] for c, m in zip(*np.nonzero(executed))]
            if len(self._by_architecture) >= ARCHITECTURES_HELD:  # a bound on what clients sending codes can make it hold
                self._by_architecture.clear()
            self._by_architecture[key] = children
        return children


ARCHITECTURES_HELD = 4096  # architectures a model keeps counters for, or holds counts back for
LATER_HELD = 1024  # updates a model holds for after the response, at most
