"""Per-block path vs fused graphs vs one `If`-driven meta-graph, on a real bundle (a few seconds).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fused.py [--model models/cifar10-default]

Three ways to run the architecture an image chose, timed on the same inputs in one run:

- per-block: the executor's path, one onnxruntime call per stem / executed block / head;
- fused: service/fused.py, one session per architecture, composed and compiled at load time;
- if-graph: ONE session for the whole meta-graph, each (cell, module) block inside an ONNX `If`
  whose condition comes from a policy input (so a batch must share one architecture), and the
  cell merges (scale per cell from an input) in the graph.

Prints median wall time per call (ms) at batch 1 and 8 for a few architectures, the build
time of a fused graph, and the largest logit difference of each method from the per-block path.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service import architecture, fused
from service.bundle import load_bundle, session_options
from service.executor import Executor


def if_graph(library: fused.GraphLibrary, space) -> onnx.ModelProto:
    """The whole meta-graph with one `If` per (cell, module): inputs `input`, `run` (bool,
    cells * modules, empty-cell rule applied) and `scale` (float, cells: 1/k under mean, else 1)."""
    graph = onnx.GraphProto()
    graph.name = "instanas_if"
    graph.input.add().CopyFrom(library.stem.graph.input[0])
    graph.input.append(helper.make_tensor_value_info("run", TensorProto.BOOL, [space.num_cells * space.num_modules]))
    graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [space.num_cells]))
    graph.output.add().CopyFrom(library.head.graph.output[0])
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    h = "stem/out"
    fused.copy_graph(library.stem.graph, graph, "stem/", "input", h)
    for cell in space.cells:
        c = cell.index
        graph.initializer.append(numpy_helper.from_array(np.array(c, np.int64), f"c{c}/index"))
        graph.node.append(helper.make_node("Gather", ["scale", f"c{c}/index"], [f"c{c}/scale"], axis=0))
        acc = h if cell.skippable else "zero"
        for m in range(space.num_modules):
            idx = f"c{c}m{m}/index"
            graph.initializer.append(numpy_helper.from_array(np.array(c * space.num_modules + m, np.int64), idx))
            graph.node.append(helper.make_node("Gather", ["run", idx], [f"c{c}m{m}/cond"], axis=0))
            # then: the block's nodes (initializers stay in the outer graph, read from the branch)
            then = onnx.GraphProto()
            then.name = f"c{c}m{m}/then"
            block = library.blocks[(c, m)].graph
            scratch = onnx.GraphProto()
            fused.copy_graph(block, scratch, f"c{c}m{m}/", h, f"c{c}m{m}/y")
            graph.initializer.extend(scratch.initializer)
            then.node.extend(scratch.node)
            then.node.append(helper.make_node("Mul", [f"c{c}m{m}/y", f"c{c}/scale"], [f"c{c}m{m}/ys"]))
            then.node.append(helper.make_node("Add", [acc, f"c{c}m{m}/ys"], [f"c{c}m{m}/then_out"]))
            then.output.append(helper.make_tensor_value_info(f"c{c}m{m}/then_out", TensorProto.FLOAT, None))
            other = helper.make_graph([helper.make_node("Identity", [acc], [f"c{c}m{m}/else_out"])], f"c{c}m{m}/else",
                                      [], [helper.make_tensor_value_info(f"c{c}m{m}/else_out", TensorProto.FLOAT, None)])
            out = f"c{c}m{m}/acc"
            graph.node.append(helper.make_node("If", [f"c{c}m{m}/cond"], [out], then_branch=then, else_branch=other))
            acc = out
        h = acc
    fused.copy_graph(library.head.graph, graph, "head/", h, "output")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in library.opsets.items()])
    model.ir_version = library.ir_version
    return model


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/cifar10-default")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    space = bundle.manifest.search_space
    executor = Executor(bundle)
    library = fused.GraphLibrary(bundle)
    t0 = time.perf_counter()
    if_session = ort.InferenceSession(if_graph(library, space).SerializeToString(), session_options(1),
                                      providers=["CPUExecutionProvider"])
    if_build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x8 = rng.standard_normal((8, 3, space.input_size, space.input_size)).astype(np.float32)
    chosen = executor.run(x8[:1]).executed[0] if bundle.manifest.controllers else None
    archs = {"mobilenet_v2": architecture.mobilenet_v2(space), "cheapest": architecture.cheapest(space),
             "all modules": np.ones((space.num_cells, space.num_modules), bool)}
    if chosen is not None:
        archs["controller's choice"] = chosen
    print(f"machine: {platform.machine()} {platform.processor() or ''}, onnxruntime {ort.__version__}, "
          f"one intra-op thread; bundle {bundle.manifest.name} ({space.num_cells}x{space.num_modules}, "
          f"width {space.width_multiplier}, combine {space.combine}); if-graph build {if_build:.2f} s")
    print(f"{'architecture':<22}{'modules':>8}{'batch':>6}{'per-block':>11}{'fused':>9}{'if-graph':>10}"
          f"{'fused x':>9}{'if x':>7}{'build s':>9}{'max|d| fused':>14}{'max|d| if':>11}")
    for name, executed in archs.items():
        executed = architecture.apply_empty_cell_rule(executed[None], space)[0]
        t0 = time.perf_counter()
        graph = fused.build(library, space, executed)
        build_s = time.perf_counter() - t0
        k = np.maximum(executed.sum(1), 1)
        scale = (1.0 / k if space.combine == "mean" else np.ones_like(k)).astype(np.float32)
        feeds = {"run": executed.reshape(-1).copy(), "scale": scale}
        for n in (1, 8):
            x = x8[:n]
            many = np.repeat(executed[None], n, 0)
            reference = executor.per_block(x, many)
            per_block = median_ms(lambda x=x, many=many: executor.per_block(x, many), args.repeats)
            fused_ms = median_ms(lambda x=x, graph=graph: graph(x), args.repeats)
            if_ms = median_ms(lambda x=x, feeds=feeds: if_session.run(None, {"input": x, **feeds}), args.repeats)
            d_fused = np.abs(graph(x) - reference).max()
            d_if = np.abs(if_session.run(None, {"input": x, **feeds})[0] - reference).max()
            print(f"{name:<22}{int(executed.sum()):>8}{n:>6}{per_block:>11.3f}{fused_ms:>9.3f}{if_ms:>10.3f}"
                  f"{per_block / fused_ms:>9.2f}{per_block / if_ms:>7.2f}{build_s:>9.3f}{d_fused:>14.2e}{d_if:>11.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
