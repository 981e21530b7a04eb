"""Loading a model bundle: manifest validation, sha256 of every file, onnxruntime sessions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from pydantic import ValidationError

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

    return Bundle(
        path=root,
        manifest=manifest,
        sha256=digest,
        stem=session(manifest.stem.file),
        head=session(manifest.head.file),
        blocks={(b.cell, b.module): session(b.file) for b in manifest.blocks},
        controllers={c.name: session(c.file) for c in manifest.controllers},
    )


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
