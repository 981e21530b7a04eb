"""Hot reload: bundles verified and warmed up off the request path, then swapped in at once.

`POST /admin/reload` (body `{"path": "<bundle or repository folder>"}`, or none for the folder
served now) and SIGHUP (the folder served now, read again) build a whole new repository
(service/repository.py: every bundle's manifest and sha256 of every file; service/warmup.py:
every graph run and checked, fused graphs compiled) in a worker thread while the old one
serves. The swap is one assignment of `app.state.models`: a request resolves its model once,
when it starts, so requests in flight finish on the old bundle and later ones get the new;
each response's `model` says which answered. Models added to the folder are served from the
swap, models removed from it answer 404 from then on. Each old model is stopped once its
batcher is idle (or after `INSTANAS_SHUTDOWN_TIMEOUT`). A bundle that fails any check leaves
the old repository serving, and the reload answers 422 `invalid_bundle` with the reason; 409
`reload_in_progress` while another runs, 503 `draining` during a shutdown.

With several worker processes (service/workers.py) a reload is made global: the worker that
took it tells the supervisor, which sends SIGHUP to every other worker, and each reloads the
same folder (service/workers.py, its reload file).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from service import heap
from service.bundle import BundleError
from service.errors import ApiError, retry_after
from service.repository import Repository, load_repository
from service.state import ServiceState

log = logging.getLogger("instanas.service")

RETIRE_GRACE_S = 1.0  # after the old batcher is idle, for requests that resolved the old state just before the swap


def _lock(app) -> asyncio.Lock:
    lock = getattr(app.state, "reload_lock", None)
    if lock is None:
        lock = app.state.reload_lock = asyncio.Lock()
    return lock


def in_progress(app) -> bool:
    """A reload is running (another would be refused with 409)."""
    return _lock(app).locked()


async def reload(app, path: str | None = None) -> dict:
    """Load, verify and warm up the bundle or repository at `path` (default: the folder served),
    then swap it in. Returns {"model" (the default model), "previous" (the default before),
    "models", "seconds"}; ApiError when nothing changed."""
    current: Repository = app.state.models
    if current.draining:
        raise ApiError(503, "draining", "the server is shutting down", retry_after())
    lock = _lock(app)
    if lock.locked():
        raise ApiError(409, "reload_in_progress", "another reload is running; retry when it has finished")
    async with lock:
        current = app.state.models
        target = Path(path).expanduser() if path else current.path
        t0 = time.perf_counter()
        metrics = app.state.metrics
        try:
            new = await asyncio.to_thread(load_repository, app.state.settings, metrics, target,
                                          before_batch=app.state.before_batch)
        except BundleError as exc:
            metrics.reloads.labels("error").inc()
            log.error("reload refused, still serving %s: %s", current.path, exc)
            raise ApiError(422, "invalid_bundle", f"the bundle was not loaded, the old one still serves: {exc}") from None
        new.ready = True
        new.draining = current.draining  # a SIGTERM that came while the new models loaded
        app.state.models = new  # the swap: requests from now on resolve the new models
        app.openapi_schema = None  # the document quotes the bundle's classes
        kept = {(r["name"], r["version"], r["sha256"]) for r in new.refs()}
        for ref in current.refs():
            if (ref["name"], ref["version"], ref["sha256"]) not in kept:
                metrics.unserved(ref["name"], ref["version"], ref["sha256"])
        new.mark_served(metrics)
        metrics.reloads.labels("ok").inc()
        seconds = time.perf_counter() - t0
        log.info("reloaded: now serving %s from %s (%.2f s)",
                 ", ".join(f"{s.name} {s.manifest.version}" for s in new.states.values()), new.path, seconds)
        task = asyncio.ensure_future(_retire_all(list(current.states.values()), app.state.settings.shutdown_timeout))
        _background(app).add(task)
        task.add_done_callback(_background(app).discard)
        return {"model": new.get().model_json, "previous": current.get().model_json, "models": new.refs(),
                "seconds": round(seconds, 3)}


def _background(app) -> set:
    tasks = getattr(app.state, "reload_tasks", None)
    if tasks is None:
        tasks = app.state.reload_tasks = set()
    return tasks


async def _retire_all(states: list[ServiceState], timeout_s: float) -> None:
    """Stop the old states, each once nothing runs on it (or after `timeout_s`); then, with no
    reference to them left, one freeze (service/heap.py): the old models' cycles are collected,
    the new models' objects frozen."""
    await asyncio.gather(*(_retire(old, timeout_s) for old in states))
    states.clear()
    heap.freeze()


async def _retire(old: ServiceState, timeout_s: float) -> None:
    old.ready = False
    deadline = time.monotonic() + timeout_s
    while not old.batcher.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(RETIRE_GRACE_S)
    old.stop()


async def reload_logged(app, path: str | None, why: str) -> None:
    """A reload that nobody waits for (SIGHUP): its outcome goes to the log."""
    try:
        await reload(app, path)
    except ApiError as exc:
        log.error("%s reload: %s", why, exc.message)
    except Exception:  # noqa: BLE001 - a failed reload must not take the server down
        log.exception("%s reload failed", why)
