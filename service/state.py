"""What the app holds while it serves, and the typed dependency that hands it to routes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from service import architecture
from service.bundle import Bundle
from service.executor import Executor
from service.metrics import Metrics
from service.schemas import ModelRef
from service.settings import Settings


class ServiceState:
    """Bundle, executor, costs, metrics and the admission counters of one app."""

    def __init__(self, settings: Settings, bundle: Bundle):
        self.settings = settings
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.executor = Executor(bundle)
        self.costs = architecture.CostTable.of_manifest(bundle.manifest)
        space = bundle.manifest.search_space
        self.metrics = Metrics(space.num_cells, space.num_modules)
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.waiting = 0
        self.ready = False
        self.model_ref = ModelRef(name=self.manifest.name, version=self.manifest.version, sha256=bundle.sha256)
        self.metrics.model_info.labels(self.manifest.name, self.manifest.version, bundle.sha256).set(1)


def get_state(request: Request) -> ServiceState:
    return request.app.state.instanas


State = Annotated[ServiceState, Depends(get_state)]
