"""A training run's folder: config, JSONL log, atomic checkpoints, the latency table."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from training.config import RunConfig, from_dict


class RunError(RuntimeError):
    """The run folder lacks what a phase needs (an earlier phase, a config)."""


class RunDir:
    def __init__(self, path: str | Path, config: RunConfig | None = None):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if config is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(config_file, json.dumps(config.to_dict(), indent=2).encode())
        elif config_file.exists():
            config = from_dict(json.loads(config_file.read_text()))
        else:
            raise RunError(f"{config_file} does not exist: run a phase with --config first")
        self.config = config

    def log(self, phase: str, **figures) -> None:
        """Append one line of figures (an epoch's, a step's, a phase's) to log.jsonl."""
        record = {"time": round(time.time(), 3), "phase": phase, **figures}
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self, phase: str) -> Path:
        return self.path / f"{phase}.pt"

    def save(self, phase: str, state: dict) -> None:
        tmp = self.checkpoint(phase).with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint(phase))

    def load(self, phase: str) -> dict | None:
        path = self.checkpoint(phase)
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None

    def require(self, phase: str) -> dict:
        state = self.load(phase)
        if state is None or not state.get("done"):
            raise RunError(f"phase {phase!r} has not finished in {self.path}; run it first")
        return state


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def source_revision() -> str:
    """The git commit the code came from, with '+dirty' when the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
