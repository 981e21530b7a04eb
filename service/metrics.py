"""Prometheus metrics of the service, on a registry of its own (one per app)."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, num_cells: int, num_modules: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("instanas_requests_total", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("instanas_request_duration_seconds", "Request handling time.",
                                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("instanas_stage_duration_seconds",
                                        "Time per stage of a classification: decode, queue (every executor busy), "
                                        "controller, backbone. Batching holds: instanas_batch_wait_seconds.",
                                        ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.architecture_latency = Histogram("instanas_architecture_estimated_latency_seconds",
                                              "Estimated latency of the architecture chosen for each image.",
                                              buckets=_LATENCY_BUCKETS, registry=r)
        self.architecture_mflops = Histogram("instanas_architecture_mflops", "MFLOPs of the architecture chosen for each image.",
                                             buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.architecture_modules = Histogram("instanas_architecture_modules", "Modules executed for each image.",
                                              buckets=tuple(range(0, num_cells * num_modules + 1, max(1, num_cells // 2))),
                                              registry=r)
        self.module_executions = Counter("instanas_module_executions_total",
                                         "Images that ran each (cell, module) block.", ["cell", "module"], registry=r)
        self.batch_size = Histogram("instanas_batch_size", "Images per executor run (a batch gathered across requests).",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.batch_wait = Histogram("instanas_batch_wait_seconds",
                                    "Time a classification was held, with an executor free, to gather a batch.",
                                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025),
                                    registry=r)
        # Fused hot paths (service/fused.py): images served by a compiled whole-architecture graph or not.
        self.fused_hits = Counter("instanas_fused_cache_hits_total",
                                  "Images whose architecture ran as one fused graph from the cache.", registry=r)
        self.fused_misses = Counter("instanas_fused_cache_misses_total",
                                    "Images whose architecture had no fused graph ready (ran block by block).",
                                    registry=r)
        self.fused_cache_size = Gauge("instanas_fused_cache_size", "Fused architecture graphs held now.", registry=r)
        self.fused_builds = Counter("instanas_fused_builds_total", "Fused graphs compiled, by result (ok, error).",
                                    ["result"], registry=r)
        self.fused_build_duration = Histogram("instanas_fused_build_duration_seconds",
                                              "Time to compose and compile one fused graph (off the request path).",
                                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                                              registry=r)
        self.fused_evictions = Counter("instanas_fused_cache_evictions_total",
                                       "Fused graphs dropped from the cache (least recently used).", registry=r)
        self.in_flight = Gauge("instanas_in_flight_requests", "Classifications being executed now.", registry=r)
        self.queue_depth = Gauge("instanas_queue_depth", "Classifications waiting for an executor.", registry=r)
        self.queue_depth_peak = Gauge("instanas_queue_depth_peak",
                                      "The highest instanas_queue_depth since the process started.", registry=r)
        self._queued = self._queue_peak = self._bodies_peak = 0
        self.buffered_bytes = Gauge("instanas_buffered_body_bytes",
                                    "Request body bytes held now (reserved by requests being read or classified).",
                                    registry=r)
        self.buffered_bytes_peak = Gauge("instanas_buffered_body_bytes_peak",
                                         "The highest instanas_buffered_body_bytes since the process started.",
                                         registry=r)
        self.open_connections = Gauge("instanas_open_connections", "Client connections open now.", registry=r)
        self.connections_closed = Counter("instanas_connections_closed_total",
                                          "Connections closed by the connection limit: evicted (the longest idle, "
                                          "for a new one) or refused (503, every other connection busy).",
                                          ["reason"], registry=r)
        self.reloads = Counter("instanas_reloads_total", "Bundle reloads, by result (ok, error).", ["result"], registry=r)
        self.operating_points = Counter("instanas_operating_point_total",
                                        "Images by the operating point that chose their architecture, and why.",
                                        ["operating_point", "reason"], registry=r)
        self.rejections = Counter("instanas_rejections_total", "Requests refused, by reason.", ["reason"], registry=r)
        self.model_info = Gauge("instanas_model_info", "The served bundle (value 1).", ["name", "version", "sha256"],
                                registry=r)
        # Children made up front, so every (cell, module) pair is exported from the start at 0.
        self._executions = [[self.module_executions.labels(str(c), str(m)) for m in range(num_modules)]
                            for c in range(num_cells)]
        for result in ("ok", "error"):
            self.fused_builds.labels(result)
            self.reloads.labels(result)
        for reason in ("evicted", "refused"):
            self.connections_closed.labels(reason)

    def queue_moved(self, delta: int) -> None:
        """Jobs entered (+) or left (-) a batcher's queue: the depth and its peak."""
        self._queued += delta
        self.queue_depth.set(self._queued)
        if self._queued > self._queue_peak:
            self._queue_peak = self._queued
            self.queue_depth_peak.set(self._queued)

    def bodies_held(self, used: int) -> None:
        """Request body bytes reserved now (service.limits.ByteBudget): the gauge and its peak."""
        self.buffered_bytes.set(used)
        if used > self._bodies_peak:
            self._bodies_peak = used
            self.buffered_bytes_peak.set(used)

    def observe_architecture(self, executed: np.ndarray, latency_ms: float, mflops: float) -> None:
        """One image's architecture: (cells, modules) boolean of what ran."""
        for c, m in zip(*np.nonzero(executed)):
            self._execution(c, m).inc()
        self.architecture_latency.observe(latency_ms / 1e3)
        self.architecture_mflops.observe(mflops)
        self.architecture_modules.observe(int(executed.sum()))

    def _execution(self, c: int, m: int):
        """The counter child of block (c, m), made when a reloaded bundle has more cells or modules."""
        while c >= len(self._executions):
            self._executions.append([])
        row = self._executions[c]
        while m >= len(row):
            row.append(self.module_executions.labels(str(c), str(len(row))))
        return row[m]
