"""Export a trained run to a model bundle: one ONNX graph per block, manifest with hashes.

Layout (see docs/DESIGN.md): controller.onnx, stem.onnx, blocks/<cell>_<module>.onnx,
head.onnx, manifest.json. Each graph takes a dynamic batch. After writing, the bundle is
loaded by the service's own executor and compared with the PyTorch model on real images.
"""

from __future__ import annotations

import datetime
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from service import architecture
from service.bundle import sha256_file
from service.manifest import (
    GREEDY_THRESHOLD,
    BlockFile,
    Controller,
    Evaluation,
    FrequentArchitecture,
    GraphFile,
    Manifest,
    Preprocessing,
    Profile,
)
from training.context import Context
from training.rundir import RunError, source_revision, write_atomic

OPSET = 17


def export_graph(module: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Write `module` (eval mode, fp32) as an ONNX graph `input` -> `output` with a dynamic batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        # The TorchScript exporter writes these small static graphs in a fraction of a second
        # each, against seconds for the torch.export one; the bundle has 80+ of them.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def block_file(cell: int, module: int) -> str:
    return f"blocks/{cell:02d}_{module}.onnx"


def trained_models(ctx: Context):
    """The latest finished meta-graph and controller of the run: finetune, else search."""
    for phase in ("finetune", "search"):
        state = ctx.run.load(phase)
        if state is not None and state.get("done"):
            metagraph, controller = ctx.new_metagraph(), ctx.new_controller()
            metagraph.load_state_dict(state["metagraph"])
            controller.load_state_dict(state["controller"])
            return metagraph.eval(), controller.eval(), phase
    raise RunError(f"no finished search or finetune phase in {ctx.run.path}; run them first")


def controller_file(name: str) -> str:
    return f"controllers/{name}.onnx"


def write_bundle(out: Path, metagraph, controllers: dict[str, nn.Module], table: dict, *, name: str, version: str,
                 dataset: str, classes: list[str], preprocessing: Preprocessing, default_controller: str | None = None,
                 fixed_architecture: str | None = None, evaluations: dict[str, Evaluation] | None = None,
                 evaluation: Evaluation | None = None, frequent_architectures: list[FrequentArchitecture] = (),
                 training: dict | None = None) -> Manifest:
    """Export every graph of `metagraph`, and each controller of `controllers` (operating point
    name -> controller; none for a static bundle), into `out`, and write the manifest with each
    file's sha256 and its cost from `table`. `default_controller` defaults to the first point."""
    evaluations = evaluations or {}
    space = metagraph.space

    def graph(net: nn.Module, shape, file: str, cost: dict, cls=GraphFile, **extra):
        export_graph(net, shape, out / file)
        return cls(file=file, sha256=sha256_file(out / file), latency_ms=cost["latency_ms"],
                   mflops=cost["mflops"], params=cost["params"], **extra)

    image_shape = (3, space.input_size, space.input_size)
    last = space.cells[-1]
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dataset=dataset,
        classes=classes,
        preprocessing=preprocessing,
        search_space=space,
        stem=graph(metagraph.stem, image_shape, "stem.onnx", table["stem"]),
        head=graph(metagraph.head, (last.out_channels, last.output_size, last.output_size), "head.onnx", table["head"]),
        blocks=[graph(metagraph.cells[cell.index][m], (cell.in_channels, cell.input_size, cell.input_size),
                      block_file(cell.index, m), table["blocks"][cell.index][m], BlockFile, cell=cell.index, module=m)
                for cell, m in tqdm([(c, m) for c in space.cells for m in range(len(c.modules))],
                                    desc="export blocks", unit="graph", mininterval=5)],
        controllers=[graph(net, image_shape, controller_file(point), table["controller"], Controller, name=point,
                           threshold=GREEDY_THRESHOLD, evaluation=evaluations.get(point))
                     for point, net in controllers.items()],
        default_controller=(default_controller or next(iter(controllers))) if controllers else None,
        fixed_architecture=fixed_architecture,
        frequent_architectures=list(frequent_architectures),
        profile=Profile(**table["profile"]),
        evaluation=evaluation,
        training=training or {},
    )
    write_atomic(out / "manifest.json", (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest


def run(ctx: Context, bundle: str | None = None, name: str | None = None) -> Path:
    """Export the run's latest trained models, check the bundle against PyTorch, then move it into place."""
    from training.finetune import evaluate_controller
    from training.latency import load_table

    out = Path(bundle) if bundle else ctx.run.path / "bundle"
    metagraph, controller, phase = trained_models(ctx)
    table = load_table(ctx.run)
    figures = evaluate_controller(ctx, metagraph, controller, table)
    dataset = Path(ctx.data_root).resolve().name
    revision = source_revision()
    now = datetime.datetime.now(datetime.timezone.utc)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    evaluation = Evaluation(dataset=dataset, split="test", images=figures["images"], top1=round(figures["top1"], 4),
                            mean_estimated_latency_ms=round(figures["latency_ms"], 4),
                            mean_mflops=round(figures["mflops"], 3), mean_modules_executed=round(figures["modules"], 3))
    write_bundle(
        tmp, metagraph, {"default": controller}, table,
        name=name or ctx.config.name,
        version=f"{now:%Y%m%d.%H%M%S}-{revision[:12]}",
        dataset=dataset,
        classes=ctx.train.classes,
        preprocessing=Preprocessing(input_size=ctx.space.input_size, mean=ctx.mean, std=ctx.std),
        evaluations={"default": evaluation},
        training={"phase": phase, "config": ctx.config.to_dict(), "source_revision": revision},
    )
    diff = check_parity(ctx, tmp, metagraph, controller)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    ctx.run.log("export", bundle=str(out), parity_max_abs_diff=diff, **figures)
    print(f"exported {out}: top1={figures['top1']:.4f} on {figures['images']} test images, "
          f"parity with PyTorch {diff:.2g}", flush=True)
    return out


@torch.no_grad()
def check_parity(ctx: Context, bundle: Path, metagraph, controller, images: int = 64, tolerance: float = 1e-4) -> float:
    """Run real test images through the service's executor and the PyTorch model; they must agree."""
    from service.bundle import load_bundle
    from service.executor import Executor

    loaded = load_bundle(bundle)
    executor = Executor(loaded)
    x, _ = next(iter(ctx.batches("test", images)))
    x = x.cpu()
    metagraph, controller = metagraph.cpu().float(), controller.cpu().float()
    policy = controller(x) >= GREEDY_THRESHOLD
    expected = metagraph(x, policy).numpy()
    result = executor.run(x.numpy())
    served_policy = result.executed
    torch_executed = architecture.apply_empty_cell_rule(policy.numpy(), ctx.space)
    if not np.array_equal(served_policy, torch_executed):
        raise RuntimeError("exported controller chose other architectures than the PyTorch controller")
    diff = float(np.abs(result.logits - expected).max())
    if diff > tolerance:
        raise RuntimeError(f"exported bundle differs from the PyTorch model by {diff:.3g} (> {tolerance})")
    metagraph.to(ctx.device, memory_format=ctx.memory_format)
    controller.to(ctx.device, memory_format=ctx.memory_format)
    return diff
