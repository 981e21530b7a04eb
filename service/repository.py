"""The model repository: every bundle the service serves at once, by name.

`INSTANAS_MODEL` is either one bundle folder (it holds `manifest.json`) or a repository: a
folder with one bundle per subfolder, laid out as Triton and KServe lay out theirs. As in
Triton, a bundle's folder is named as the model it holds (its manifest's `name`); a
mismatch, two bundles of one name, or a repository with no bundle refuses to start, naming
the folder. Subfolders without a manifest are ignored (and logged), so a repository may hold
other files; so are hidden ones and `*.partial` (an export being written: training/export.py).

Each model gets its own `ServiceState` (executor, fused cache, batcher, operating points,
metrics labelled with its name) and is chosen by name: `/v2/models/{name}/...`,
`/classify?model=...`, `/model?model=...`. Requests that name no model go to the default:
`INSTANAS_DEFAULT_MODEL`, or the first name in sorted order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from service import warmup
from service.bundle import BundleError, load_bundle
from service.errors import ApiError
from service.manifest import is_partial
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("instanas.service")


def bundle_folders(path: Path) -> dict[str, Path]:
    """The bundle folders at `path` by the name the service will give them: `path` itself when it
    is a bundle, else its subfolders that are (BundleError when there is none)."""
    if (path / "manifest.json").is_file():
        from service.bundle import read_manifest

        return {read_manifest(path)[0].name: path}
    if not path.is_dir():
        raise BundleError(f"{path}: neither a model bundle (no manifest.json) nor a model repository folder")
    found: dict[str, Path] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if sub.name.startswith(".") or is_partial(sub):  # hidden, or an export still being written
            continue
        if not (sub / "manifest.json").is_file():
            log.info("model repository %s: %s holds no manifest.json, not served", path, sub.name)
            continue
        found[sub.name] = sub
    if not found:
        raise BundleError(f"{path}: no manifest.json, and no subfolder holds one: neither a model bundle nor a "
                          "model repository")
    return found


class Repository:
    """The served models by name, and which answers requests that name none."""

    def __init__(self, path: Path, states: dict[str, ServiceState], default: str):
        self.path, self.states, self.default = path, states, default
        self.draining = False  # SIGTERM received (service/server.py): readiness 503 while requests are still served

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.states.values())

    @ready.setter
    def ready(self, value: bool) -> None:
        for s in self.states.values():
            s.ready = value

    @property
    def serving(self) -> bool:
        """Ready and not draining: what readiness probes answer (GET /healthz/ready, /v2/health/ready)."""
        return self.ready and not self.draining

    def refs(self) -> list[dict]:
        """Every served model's reference (name, version, sha256), as responses carry it."""
        return [s.model_json for s in self.states.values()]

    def mark_served(self, metrics: Metrics) -> None:
        """instanas_model_info for these models: called once they answer requests (not before a reload's swap)."""
        for s in self.states.values():
            metrics.served(s.manifest.name, s.manifest.version, s.bundle.sha256)

    def get(self, name: str | None = None) -> ServiceState:
        """The model named `name` (the default for None); 404 `unknown_model` otherwise."""
        state = self.states.get(self.default if name is None else name)
        if state is None:
            raise ApiError(404, "unknown_model", f"unknown model {name!r}; this server serves "
                           f"{', '.join(repr(n) for n in self.states)}")
        return state

    def stop(self) -> None:
        for s in self.states.values():
            s.stop()


def load_repository(settings: Settings, metrics: Metrics, path: Path | None = None, *,
                    before_batch: Callable[[list], None] | None = None) -> Repository:
    """Load, verify and warm up every bundle at `path` (default: `INSTANAS_MODEL`); BundleError
    names the first that fails (and nothing is kept running). `before_batch`: each model's
    (service.app.create_app)."""
    path = Path(path or settings.model).expanduser()
    folders = bundle_folders(path)
    default = settings.default_model or next(iter(folders))
    if default not in folders:
        raise BundleError(f"{path}: INSTANAS_DEFAULT_MODEL is {default!r}, but the models here are "
                          f"{', '.join(repr(n) for n in folders)}")
    states: dict[str, ServiceState] = {}
    try:
        for name, folder in folders.items():
            bundle = load_bundle(folder, intra_op_threads=settings.intra_op_threads)
            if bundle.manifest.name != name:
                raise BundleError(f"{folder}: the folder of a bundle in a model repository is named as its model, "
                                  f"but its manifest says {bundle.manifest.name!r}; rename the folder")
            state = states[name] = ServiceState(settings, bundle, metrics, before_batch=before_batch)
            warmup.prepare(state)  # every graph run and checked, fused graphs compiled (BundleError otherwise)
    except BaseException:
        for state in states.values():
            state.stop()
        raise
    return Repository(path, states, default)


async def get_models(request: Request) -> Repository:
    """The repository served now (a reload swaps it: service/reload.py). `async`, as every
    dependency here: FastAPI runs a plain `def` dependency in a worker thread, a thread hop
    per request (measured: about 0.15 ms of a 2.3 ms request)."""
    return request.app.state.models


Models = Annotated[Repository, Depends(get_models)]
