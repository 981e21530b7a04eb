"""Warm-up: before the service says it is ready, every graph of the bundle has run once and
given the shape the manifest promises.

sha256 checks prove the files are the ones the manifest lists, not that the manifest lists
the right files: a controller swapped for another graph (its hash updated) would load, then
fail on the first request. `check_graphs` runs the stem, every block, the head and every
controller on a small batch and compares each output's shape with the manifest's search space
(controllers must also give probabilities); `prepare` then compiles the fused graphs of the
manifest's frequent architectures (service/fused.py) and checks each against the per-block
path. A failure is a `BundleError`: `instanas-serve` exits with status 2 and the message, and
a reload (service/reload.py) keeps the old bundle.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from service import architecture
from service.bundle import Bundle, BundleError
from service.cascade import pool
from service.fused import split_key

log = logging.getLogger("instanas.service")

WARMUP_BATCH = 2  # rows, so a graph whose batch dimension is fixed at 1 is caught too
FUSED_TOLERANCE = 1e-3  # fused logits against the per-block path (they agree to rounding)


def _run(bundle: Bundle, what: str, session, x: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    try:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise BundleError(f"takes {len(inputs)} inputs, not 1")
        y = session.run(None, {inputs[0].name: x})[0]
    except BundleError as exc:
        raise BundleError(f"{bundle.path}: {what} {exc}") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise BundleError(f"{bundle.path}: {what} does not run on a {x.shape} input as the manifest says it "
                          f"should: {exc}") from None
    if tuple(y.shape) != expected:
        raise BundleError(f"{bundle.path}: {what} gives shape {tuple(y.shape)} for a {x.shape} input; the manifest "
                          f"implies {expected}")
    if not np.isfinite(y).all():
        raise BundleError(f"{bundle.path}: {what} gives non-finite values")
    return y


def check_graphs(bundle: Bundle) -> None:
    """Run every graph once (the networks' too) on a deterministic batch; BundleError on any failure
    or wrong shape."""
    for network in bundle.networks.values():
        check_graphs(network)
    manifest = bundle.manifest
    space = manifest.search_space
    n, size = WARMUP_BATCH, space.input_size
    rng = np.random.default_rng(0)
    image = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    first, last = space.cells[0], space.cells[-1]
    _run(bundle, f"stem {manifest.stem.file}", bundle.stem, image,
         (n, first.in_channels, first.input_size, first.input_size))
    for cell in space.cells:
        x = rng.standard_normal((n, cell.in_channels, cell.input_size, cell.input_size)).astype(np.float32)
        for m in range(len(cell.modules)):
            block = manifest.block(cell.index, m)
            _run(bundle, f"block {block.file} (cell {cell.index}, module {m})", bundle.blocks[(cell.index, m)], x,
                 (n, cell.out_channels, cell.output_size, cell.output_size))
    x = rng.standard_normal((n, last.out_channels, last.output_size, last.output_size)).astype(np.float32)
    _run(bundle, f"head {manifest.head.file}", bundle.head, x, (n, space.num_classes))
    for controller in manifest.controllers:
        p = _run(bundle, f"controller {controller.file} (operating point {controller.name})",
                 bundle.controllers[controller.name], image, (n, space.num_cells, space.num_modules))
        if p.min() < 0 or p.max() > 1:
            raise BundleError(f"{bundle.path}: controller {controller.file} (operating point {controller.name}) "
                              f"gives values outside 0..1 ({p.min():.3g}..{p.max():.3g}), not probabilities")


def prepare(state, fused_timeout_s: float = 120.0) -> None:
    """Everything before a state may serve: `check_graphs`, an end-to-end batch through the
    executor, then the fused warm-up (started and waited for, each graph checked against the
    per-block path). BundleError when the bundle does not work."""
    t0 = time.perf_counter()
    bundle = state.bundle
    check_graphs(bundle)
    space = bundle.manifest.search_space
    x = np.random.default_rng(1).standard_normal((WARMUP_BATCH, 3, space.input_size, space.input_size))
    x = x.astype(np.float32)
    executor = state.executor
    points = [p for p in executor.operating_points if p not in executor.cascades] or [None]
    try:  # the per-block path, so the warm-up neither counts towards fusing nor moves the cache's metrics
        for point in points:
            logits = executor.per_block(x, executor.policy(x, point))
            if logits.shape != (WARMUP_BATCH, space.num_classes):
                raise BundleError(f"{bundle.path}: the executor gives logits of shape {logits.shape}")
        for runner in executor.cascades.values():
            for stage in runner.stages:
                logits = stage.executor.per_block(pool(x, stage.resolution), stage.executed[None].repeat(WARMUP_BATCH, 0))
                if logits.shape != (WARMUP_BATCH, space.num_classes):
                    raise BundleError(f"{bundle.path}: cascade {runner.name!r} gives logits of shape {logits.shape}")
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"{bundle.path}: a warm-up batch through the executor failed: {exc}") from None
    fused = state.fused
    state.start()  # the fused builder, with the manifest's frequent architectures queued
    if fused.enabled and not fused.wait_idle(fused_timeout_s):
        log.warning("fused warm-up not finished after %g s; it goes on in the background", fused_timeout_s)
    for key in fused.codes():
        network, code = split_key(key)
        graph = fused.peek(code, network)
        if graph is None:
            continue
        runs = executor if network is None else executor.networks[network]
        own = runs.space
        matrix = architecture.decode(code, own.num_cells, own.num_modules)
        executed = architecture.apply_empty_cell_rule(np.broadcast_to(matrix, (WARMUP_BATCH, *matrix.shape)), own)
        xs = pool(x, own.input_size)
        try:
            logits = graph(x)  # every fused graph reads the bundle's input (service/fused.py)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"{bundle.path}: the fused graph of architecture {code} does not run: {exc}") from None
        if logits.shape != (WARMUP_BATCH, space.num_classes):
            raise BundleError(f"{bundle.path}: the fused graph of architecture {code} gives shape {logits.shape}; "
                              f"the manifest implies {(WARMUP_BATCH, space.num_classes)}")
        reference = runs.per_block(xs, executed)
        if np.abs(logits - reference).max() > FUSED_TOLERANCE:
            raise BundleError(f"{bundle.path}: the fused graph of architecture {code} disagrees with its blocks")
    log.info("warm-up of %s: every graph ran (%d fused) in %.2f s", bundle.path, len(fused.codes()),
             time.perf_counter() - t0)
