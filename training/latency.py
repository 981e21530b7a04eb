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

from service.bundle import session_options
from training import flops
from training.context import Context
from training.export import export_graph
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
    cfg = ctx.config.profile
    space = ctx.space
    metagraph, controller = ctx.new_metagraph(), ctx.new_controller()
    image = (3, space.input_size, space.input_size)
    last = space.cells[-1]
    graphs = [("stem", metagraph.stem, image), ("head", metagraph.head, (last.out_channels, last.output_size, last.output_size)),
              ("controller", controller, image)]
    for cell in space.cells:
        for m in range(len(cell.modules)):
            graphs.append(((cell.index, m), metagraph.cells[cell.index][m], (cell.in_channels, cell.input_size, cell.input_size)))
    table: dict = {"blocks": [[None] * len(c.modules) for c in space.cells]}
    with tempfile.TemporaryDirectory() as tmp:
        for key, module, shape in tqdm(graphs, desc="profile", unit="graph"):
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
    write_atomic(ctx.run.path / "latency.json", json.dumps(table, indent=1).encode())
    blocks = block_latency(table)
    ctx.run.log("profile", sum_blocks_ms=float(blocks.sum()), mobilenet_v2_ms=float(blocks[:, 0].sum()),
                stem_ms=table["stem"]["latency_ms"], head_ms=table["head"]["latency_ms"],
                controller_ms=table["controller"]["latency_ms"])
    return table


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
