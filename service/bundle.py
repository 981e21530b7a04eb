"""Loading a model bundle: manifest validation, sha256 of every file, onnxruntime sessions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
from pydantic import ValidationError

from service import architecture
from service.manifest import Manifest, upgrade


class BundleError(RuntimeError):
    """The bundle cannot be served; the message says which file and why."""


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    sha256: str  # of manifest.json, which pins every other file's hash
    stem: ort.InferenceSession
    head: ort.InferenceSession
    blocks: dict[tuple[int, int], ort.InferenceSession]
    controllers: dict[str, ort.InferenceSession]  # by operating point name; empty for a static bundle
    networks: dict[str, "Bundle"] = field(default_factory=dict)  # the cascades' other networks, by name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{root}: manifest names {name!r}, which lies outside the bundle")
    return path


def read_manifest(path: str | Path) -> tuple[Manifest, str]:
    manifest_file = Path(path) / "manifest.json"
    if not manifest_file.is_file():
        raise BundleError(f"{path}: no manifest.json (is this a model bundle folder?)")
    raw = manifest_file.read_bytes()
    try:
        manifest = Manifest.model_validate(upgrade(json.loads(raw)))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_file}: not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise BundleError(f"{manifest_file}: does not match the manifest schema:\n{exc}") from None
    return manifest, hashlib.sha256(raw).hexdigest()


def load_bundle(path: str | Path, *, intra_op_threads: int = 1) -> Bundle:
    """Validate the manifest, check every file against its sha256, open one session per graph."""
    root = Path(path)
    manifest, digest = read_manifest(root)
    for entry in manifest.files():
        file = _resolve(root, entry.file)
        if not file.is_file():
            raise BundleError(f"{root}: {entry.file} is listed in the manifest but missing")
        actual = sha256_file(file)
        if actual != entry.sha256:
            raise BundleError(f"{root}: {entry.file} has sha256 {actual}, but the manifest says {entry.sha256}; "
                              "the file was changed or corrupted after export")
    options = session_options(intra_op_threads)

    def session(name: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(_resolve(root, name)), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{root}: {name} is not a loadable ONNX graph: {exc}") from None

    bundle = Bundle(
        path=root,
        manifest=manifest,
        sha256=digest,
        stem=session(manifest.stem.file),
        head=session(manifest.head.file),
        blocks={(b.cell, b.module): session(b.file) for b in manifest.blocks},
        controllers={c.name: session(c.file) for c in manifest.controllers},
        networks={n.name: _load_network(root, manifest, n, intra_op_threads) for n in manifest.networks},
    )
    _check_shapes(root, bundle)
    _check_stages(root, bundle)
    return bundle


def _load_network(root: Path, manifest: Manifest, network, intra_op_threads: int) -> "Bundle":
    """A network of `manifest`: its own bundle, pinned by its manifest's hash, over the same
    classes and cells (a prefix of each cell's modules, so its architectures are the bundle's too)."""
    folder = _resolve(root, network.path)
    where = f"{root}: network {network.name!r} ({network.path})"
    try:
        sub = load_bundle(folder, intra_op_threads=intra_op_threads)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if sub.sha256 != network.sha256:
        raise BundleError(f"{where}: manifest.json has sha256 {sub.sha256}, but the bundle's manifest says "
                          f"{network.sha256}")
    m = sub.manifest
    if m.networks:
        raise BundleError(f"{where}: a network cannot hold networks of its own")
    if m.classes != manifest.classes:
        raise BundleError(f"{where}: its classes differ from the bundle's")
    if m.preprocessing.input_size != network.resolution:
        raise BundleError(f"{where}: takes {m.preprocessing.input_size}x{m.preprocessing.input_size} inputs, "
                          f"but the manifest gives it resolution {network.resolution}")
    pre, own = m.preprocessing, manifest.preprocessing
    if (pre.mean, pre.std, pre.scale, pre.color, pre.layout) != (own.mean, own.std, own.scale, own.color, own.layout):
        raise BundleError(f"{where}: its preprocessing (mean, std, scale, colour, layout) differs from the bundle's")
    mine, theirs = manifest.search_space.cells, m.search_space.cells
    if len(mine) != len(theirs) or any(
            (a.in_channels, a.out_channels, a.stride) != (b.in_channels, b.out_channels, b.stride)
            or a.modules[: len(b.modules)] != b.modules for a, b in zip(mine, theirs)):
        raise BundleError(f"{where}: its cells are not the bundle's cells (same channels and strides, the first "
                          "modules of each)")
    return sub


def _check_shapes(root: Path, bundle: Bundle) -> None:
    """Every graph's input has the shape the search space gives it (a graph exported at another
    resolution, or for another cell, is refused here rather than failing on the first request)."""
    manifest = bundle.manifest
    space, size = manifest.search_space, manifest.preprocessing.input_size
    expected = [(f"stem {manifest.stem.file}", bundle.stem, (3, size, size))]
    expected += [(f"controller {c.file} (operating point {c.name})", bundle.controllers[c.name], (3, size, size))
                 for c in manifest.controllers]
    for b in manifest.blocks:
        cell = space.cells[b.cell]
        expected.append((f"block {b.file} (cell {b.cell}, module {b.module})", bundle.blocks[(b.cell, b.module)],
                         (cell.in_channels, cell.input_size, cell.input_size)))
    last = space.cells[-1]
    expected.append((f"head {manifest.head.file}", bundle.head, (last.out_channels, last.output_size, last.output_size)))
    for what, session, shape in expected:
        dims = session.get_inputs()[0].shape
        fixed = tuple(d if isinstance(d, int) else None for d in dims[1:])
        if len(dims) != 4 or any(d is not None and d != want for d, want in zip(fixed, shape)):
            raise BundleError(f"{root}: {what} takes inputs of shape {dims}, but the search space gives it "
                              f"(batch, {', '.join(map(str, shape))})")


def _check_stages(root: Path, bundle: Bundle) -> None:
    """Every cascade stage's architecture is one its network can run."""
    for cascade in bundle.manifest.cascades:
        for i, stage in enumerate(cascade.stages):
            net = bundle if stage.network is None else bundle.networks[stage.network]
            space = net.manifest.search_space
            try:
                architecture.decode(stage.architecture, space.num_cells, space.num_modules)
            except ValueError as exc:
                raise BundleError(f"{root}: cascade {cascade.name!r}, stage {i}: {exc}") from None


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """How every graph runs, in serving and in latency profiling alike (so the table measures
    what serving runs): sequential execution, `intra_op_threads` threads inside an operator."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads > 1:  # spinning pool threads fight the server's own for the cores (measured)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
