"""Phase `profile`: the latency lookup table, measured on the serving runtime.

Every graph the bundle will hold (stem, each (cell, module) block, head, controller) is
exported to ONNX and timed alone in onnxruntime at batch 1 on its own input shape, as
the service runs it (CPU, one intra-op thread by default). The search's latency reward
uses the blocks' table; the manifest carries all of it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from service.architecture import CostTable, cheapest, mobilenet_v2
from service.bundle import load_bundle, session_options
from service.executor import Executor
from service.manifest import Preprocessing
from training import flops
from training.bundle_writer import export_graph, write_bundle
from training.context import Context
from training.rundir import RunDir, RunError, write_atomic


def time_graph(path: Path, input_shape: tuple[int, ...], repeats: int, warmup: int, threads: int) -> float:
    """Median wall-clock milliseconds of one batch-1 run."""
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}"


def run(ctx: Context, force: bool = True) -> dict:
    """Measure the table; with force=False an existing table is kept (a resumed run keeps the
    costs its search was rewarded with)."""
    if not force and (ctx.run.path / "latency.json").exists():
        return load_table(ctx.run)
    metagraph, controller = ctx.new_metagraph(), ctx.new_controller()
    table = measure(ctx, metagraph, controller)
    table["profile"]["dispatch_ms"] = round(measure_dispatch(ctx, metagraph, controller, table), 5)
    write_atomic(ctx.run.path / "latency.json", json.dumps(table, indent=1).encode())
    blocks = block_latency(table)
    ctx.run.log("profile", sum_blocks_ms=float(blocks.sum()), mobilenet_v2_ms=float(blocks[:, 0].sum()),
                stem_ms=table["stem"]["latency_ms"], head_ms=table["head"]["latency_ms"],
                controller_ms=table["controller"]["latency_ms"], dispatch_ms=table["profile"]["dispatch_ms"])
    return table


def measure(ctx: Context, metagraph, controller=None) -> dict:
    """The table of every graph of `metagraph` (over its own space, at its input size) and of
    `controller` when given: each exported alone and timed in onnxruntime at batch 1."""
    cfg = ctx.config.profile
    space = metagraph.space
    image = (3, space.input_size, space.input_size)
    last = space.cells[-1]
    graphs = [("stem", metagraph.stem, image), ("head", metagraph.head, (last.out_channels, last.output_size, last.output_size))]
    if controller is not None:
        graphs.append(("controller", controller, image))
    for cell in space.cells:
        for m in range(len(cell.modules)):
            graphs.append(((cell.index, m), metagraph.cells[cell.index][m], (cell.in_channels, cell.input_size, cell.input_size)))
    table: dict = {"blocks": [[None] * len(c.modules) for c in space.cells]}
    with tempfile.TemporaryDirectory() as tmp:
        for key, module, shape in tqdm(graphs, desc=f"profile at {space.input_size}x{space.input_size}", unit="graph"):
            path = Path(tmp) / "graph.onnx"
            export_graph(module, shape, path)
            mflops, params = flops.count(module.to(ctx.device), shape)
            entry = {"latency_ms": round(time_graph(path, shape, cfg.repeats, cfg.warmup, cfg.intra_op_threads), 5),
                     "mflops": round(mflops, 4), "params": params}
            if isinstance(key, tuple):
                table["blocks"][key[0]][key[1]] = entry
            else:
                table[key] = entry
    table["profile"] = {"runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                        "intra_op_threads": cfg.intra_op_threads, "repeats": cfg.repeats, "machine": _machine()}
    return table


def measure_dispatch(ctx: Context, metagraph, controller, table: dict, repeats: int = 200) -> float:
    """The executor's own cost per graph call: its batch-1 wall-clock on three architectures
    (cheapest, MobileNetV2, all modules) minus the table's sum of the graphs they run, fitted
    per call by least squares through zero."""
    space = ctx.space
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(Path(tmp), metagraph, {"profile": controller}, table, name="profile", version="0",
                     dataset="none", classes=[str(i) for i in range(space.num_classes)],
                     preprocessing=Preprocessing(input_size=space.input_size, mean=ctx.mean, std=ctx.std))
        executor = Executor(load_bundle(tmp, intra_op_threads=ctx.config.profile.intra_op_threads))
    costs = CostTable(space, block_latency(table), block_mflops(table), _pair(table["stem"]), _pair(table["head"]), {})
    x = np.random.default_rng(0).standard_normal((1, 3, space.input_size, space.input_size), dtype=np.float32)
    calls, overheads = [], []
    for matrix in (cheapest(space), mobilenet_v2(space), np.ones((space.num_cells, space.num_modules), bool)):
        executed = matrix[None]
        for _ in range(ctx.config.profile.warmup):
            executor.run(x, executed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            executor.run(x, executed)
            times.append(time.perf_counter() - t0)
        overheads.append(float(np.median(times) * 1e3 - costs.latency_ms(executed)[0]))
        calls.append(int(matrix.sum()) + 2)  # the blocks, stem and head
    c, o = np.array(calls, float), np.array(overheads)
    return max(0.0, float((c * o).sum() / (c * c).sum()))


def _pair(entry: dict) -> tuple[float, float]:
    return entry["latency_ms"], entry["mflops"]


def costs(table: dict, space) -> CostTable:
    """The service's cost model over a run's latency table; its one controller is named "controller"."""
    return CostTable(space, block_latency(table), block_mflops(table), _pair(table["stem"]), _pair(table["head"]),
                     {"controller": _pair(table["controller"])}, table["profile"].get("dispatch_ms", 0.0))


def load_table(run: RunDir) -> dict:
    path = run.path / "latency.json"
    if not path.exists():
        raise RunError(f"no latency table in {run.path}; run the profile phase first")
    return json.loads(path.read_text())


def block_latency(table: dict) -> np.ndarray:
    """(cells, modules) milliseconds."""
    return np.array([[entry["latency_ms"] for entry in row] for row in table["blocks"]], dtype=np.float64)


def block_mflops(table: dict) -> np.ndarray:
    return np.array([[entry["mflops"] for entry in row] for row in table["blocks"]], dtype=np.float64)
