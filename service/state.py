"""What the app holds while it serves, and the typed dependency that hands it to routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from service import classification
from service.bundle import Bundle
from service.executor import Executor
from service.fused import FusedCache
from service.governor import LoadGovernor
from service.metrics import Metrics
from service.schemas import ModelRef
from service.settings import Settings


class ServiceState:
    """One served model: bundle, executor (with its fused-graph cache), costs, metrics, batcher."""

    def __init__(self, settings: Settings, bundle: Bundle, metrics: Metrics | None = None, *,
                 before_batch: Callable[[list], None] | None = None):
        """`metrics`: the process's (service/metrics.py); this model's are those labelled with its name.
        `before_batch(jobs)`: called where each batch runs, just before it runs (service.app.create_app)."""
        self.settings = settings
        self.before_batch = before_batch
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.name = bundle.manifest.name  # as requests name it (service/repository.py)
        space = bundle.manifest.search_space
        self.metrics = (metrics or Metrics()).model(self.name, space.num_cells, space.num_modules)
        self.fused = FusedCache(bundle, size=settings.fused_cache_size, min_count=settings.fused_min_count,
                                builds_per_minute=settings.fused_builds_per_minute,
                                intra_op_threads=settings.intra_op_threads, metrics=self.metrics)
        self.executor = Executor(bundle, fused=self.fused)
        self.costs = self.executor.costs
        self.governor = LoadGovernor(self.manifest, settings.queue_target_ms, cooldown_s=settings.load_cooldown_s)
        self.batcher = classification.make_batcher(self)
        self.ready = False
        self.model_ref = ModelRef(name=self.manifest.name, version=self.manifest.version, sha256=bundle.sha256)
        self.model_json = self.model_ref.model_dump()  # as responses carry it
        self.model_written = classification.serialized(self.model_json)
        self.module_names = [[m.name for m in cell.modules] for cell in space.cells]
        # The `architecture.cells` list of a response, by architecture code (service.classification.cells);
        # bounded, as codes a client sends are as many as it likes.
        self.cells_by_code: dict[str, list] = {}
        # (estimated ms, MFLOPs) by (architecture code, operating point), as service.classification.observe charges them
        self.costs_by_code: dict[tuple[str, str | None], tuple[float, float]] = {}
        # a response's `architecture` block, and as JSON, by (code, network, estimated ms, MFLOPs):
        # service.classification.described
        self.architectures_by_code: dict[tuple, tuple] = {}
        # every series a cascade can move, exported at 0 from the start
        for point, runner in self.executor.cascades.items():
            self.metrics.escalations.labels(point)
            for stage in runner.stages:
                self.metrics.resolutions.labels(str(stage.resolution))
        self.metrics.resolutions.labels(str(bundle.manifest.preprocessing.input_size))

    def start(self) -> None:
        """Start the fused-graph builder and queue the manifest's frequent architectures (warm-up)."""
        self.fused.start()
        for runner in self.executor.cascades.values():  # every image of a cascade runs its first stage
            for stage in runner.stages:
                self.fused.warm([stage.code], stage.network)
        frequent = sorted(self.manifest.frequent_architectures, key=lambda a: -a.share)
        self.fused.warm([a.code for a in frequent])

    def stop(self) -> None:
        self.fused.stop()
        self.batcher.close()
        self.metrics.process.retire(self.metrics)  # counts it held back are added now, later ones at once


async def get_state(request: Request) -> ServiceState:
    """The default model of the repository served now (routes that take a model name use `Models`)."""
    return request.app.state.models.get()


State = Annotated[ServiceState, Depends(get_state)]
