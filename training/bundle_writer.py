"""The files of a model bundle: each graph exported to ONNX with a dynamic batch, and the manifest
with every file's sha256 and measured cost. The profile phase writes a bundle with it to time
the executor; the export phase writes the run's bundles.
"""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm import tqdm

from service.bundle import sha256_file
from service.manifest import (
    GREEDY_THRESHOLD,
    BlockFile,
    Cascade,
    Controller,
    Evaluation,
    FrequentArchitecture,
    GraphFile,
    Manifest,
    Network,
    Preprocessing,
    Profile,
)
from training.rundir import write_atomic

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


def controller_file(name: str) -> str:
    return f"controllers/{name}.onnx"


def write_bundle(out: Path, metagraph, controllers: dict[str, nn.Module], table: dict, *, name: str, version: str,
                 dataset: str, classes: list[str], preprocessing: Preprocessing, default_controller: str | None = None,
                 fixed_architecture: str | None = None, evaluations: dict[str, Evaluation] | None = None,
                 evaluation: Evaluation | None = None, frequent_architectures: list[FrequentArchitecture] = (),
                 training: dict | None = None, networks: list[Network] = (), cascades: list[Cascade] = ()) -> Manifest:
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
        networks=list(networks),
        cascades=list(cascades),
        default_controller=(default_controller or next(iter(controllers), None) or cascades[0].name)
        if controllers or cascades else None,
        fixed_architecture=fixed_architecture,
        frequent_architectures=list(frequent_architectures),
        profile=Profile(**table["profile"]),
        evaluation=evaluation,
        training=training or {},
    )
    write_atomic(out / "manifest.json", (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest
