"""Hot reload: a bundle verified and warmed up off the request path, then swapped in at once.

`POST /admin/reload` (body `{"path": "<bundle folder>"}`, or none for the folder served now)
and SIGHUP (the folder served now, read again) build a whole new `ServiceState` in a worker
thread (load_bundle: manifest and sha256 of every file; service/warmup.py: every graph run
and checked, fused graphs compiled) while the old one serves. The swap is one assignment of
`app.state.instanas`: a request resolves its state once, when it starts, so requests in
flight finish on the old bundle and later ones get the new; each response's `model` says
which answered. The old state is stopped once its batcher is idle (or after
`INSTANAS_SHUTDOWN_TIMEOUT`). A bundle that fails any check leaves the old one serving, and
the reload answers 422 `invalid_bundle` with the reason; 409 `reload_in_progress` while
another runs, 503 `draining` during a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from service import warmup
from service.bundle import BundleError, load_bundle
from service.errors import ApiError
from service.state import ServiceState

log = logging.getLogger("instanas.service")

RETIRE_GRACE_S = 1.0  # after the old batcher is idle, for requests that resolved the old state just before the swap


def _build(current: ServiceState, path: Path) -> ServiceState:
    settings = current.settings
    bundle = load_bundle(path, intra_op_threads=settings.intra_op_threads)
    state = ServiceState(settings, bundle, metrics=current.metrics)
    try:
        warmup.prepare(state)
    except BaseException:
        state.stop()
        raise
    return state


def _lock(app) -> asyncio.Lock:
    lock = getattr(app.state, "reload_lock", None)
    if lock is None:
        lock = app.state.reload_lock = asyncio.Lock()
    return lock


async def reload(app, path: str | None = None) -> dict:
    """Load, verify and warm up the bundle at `path` (default: the one served), then swap it in.
    Returns {"model", "previous", "seconds"}; ApiError when nothing changed."""
    current: ServiceState = app.state.instanas
    if getattr(current, "draining", False):
        raise ApiError(503, "draining", "the server is shutting down", {"Retry-After": "1"})
    lock = _lock(app)
    if lock.locked():
        raise ApiError(409, "reload_in_progress", "another reload is running; retry when it has finished")
    async with lock:
        current = app.state.instanas
        target = Path(path).expanduser() if path else current.bundle.path
        t0 = time.perf_counter()
        metrics = current.metrics
        try:
            new = await asyncio.to_thread(_build, current, target)
        except BundleError as exc:
            metrics.reloads.labels("error").inc()
            log.error("reload refused, still serving %s: %s", current.bundle.path, exc)
            raise ApiError(422, "invalid_bundle", f"the bundle was not loaded, the old one still serves: {exc}") from None
        new.ready = True
        app.state.instanas = new  # the swap: requests from now on resolve the new state
        app.openapi_schema = None  # the document quotes the bundle's classes
        old_ref = current.model_ref
        if (old_ref.name, old_ref.version, old_ref.sha256) != (new.model_ref.name, new.model_ref.version,
                                                               new.model_ref.sha256):
            try:
                metrics.model_info.remove(old_ref.name, old_ref.version, old_ref.sha256)
            except KeyError:
                pass
        metrics.reloads.labels("ok").inc()
        seconds = time.perf_counter() - t0
        log.info("reloaded: now serving %s %s from %s (%.2f s)", new.manifest.name, new.manifest.version,
                 new.bundle.path, seconds)
        task = asyncio.ensure_future(_retire(current, current.settings.shutdown_timeout))
        _background(app).add(task)
        task.add_done_callback(_background(app).discard)
        return {"model": new.model_json, "previous": current.model_json, "seconds": round(seconds, 3)}


def _background(app) -> set:
    tasks = getattr(app.state, "reload_tasks", None)
    if tasks is None:
        tasks = app.state.reload_tasks = set()
    return tasks


async def _retire(old: ServiceState, timeout_s: float) -> None:
    """Stop the old state once nothing runs on it (or after `timeout_s`)."""
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
