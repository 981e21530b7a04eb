"""A training run's folder: config, JSONL log, atomic checkpoints, the latency table."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from training.config import RunConfig, from_dict
from training.phases import PHASE_FILES, SECTION_PHASES


class RunError(RuntimeError):
    """The run folder lacks what a phase needs (an earlier phase, a config), or holds a checkpoint
    that cannot be used (corrupted, or written by another phase or another config)."""


# Sections whose change makes a checkpoint's tensors another shape: refused even with --reconfigure.
_STRUCTURAL = ("space",)
STAMP = "_run"  # a checkpoint's own record of the phase and config that wrote it


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every value that differs. A key the old config
    lacks is a setting added to the code since: it had the default value, which keeps the old behaviour."""
    defaults = _flatten(json.loads(json.dumps(RunConfig().to_dict())))
    a, b = {**defaults, **_flatten(old)}, _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


class RunDir:
    """A run's folder. The config is fixed when the run starts: passing a different one later
    is refused where it would change a phase that has already started (its checkpoint
    exists), unless `reconfigure` is set; changes to phases not started yet are taken."""

    main = True  # False on torchrun ranks other than 0: they neither log nor save

    def __init__(self, path: str | Path, config: RunConfig | None = None, *, reconfigure: bool = False):
        self.path = Path(path)
        self.reconfigure = reconfigure
        config_file = self.path / "config.json"
        if config is not None:
            if config_file.exists():
                # compared as JSON, where tuples are lists
                new = json.loads(json.dumps(config.to_dict()))
                self._check_changes(json.loads(config_file.read_text()), new, reconfigure)
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(config_file, json.dumps(config.to_dict(), indent=2).encode())
        elif config_file.exists():
            config = from_dict(json.loads(config_file.read_text()))
        else:
            raise RunError(f"{config_file} does not exist: run a phase with --config first")
        self.config = config

    def started(self) -> list[str]:
        """Phases that have written a checkpoint (or, for `profile`, the latency table)."""
        return [phase for phase, file in PHASE_FILES.items() if (self.path / file).exists()]

    def _check_changes(self, old: dict, new: dict, reconfigure: bool) -> None:
        changes = config_changes(old, new)
        if not changes:
            return
        started = set(self.started())
        blocking = {}
        for key in changes:
            section = key.split(".")[0]
            touched = set(SECTION_PHASES.get(section, PHASE_FILES)) & started
            if touched:
                blocking[key] = sorted(touched)
        if blocking and not reconfigure:
            lines = "\n".join(f"  {k}: {changes[k][0]!r} -> {changes[k][1]!r} (phase {', '.join(p)} already started)"
                              for k, p in blocking.items())
            raise RunError(f"{self.path} was started with another config; refusing to change:\n{lines}\n"
                           "resume with the same --config (or none), or pass --reconfigure to change it anyway")
        self.path.mkdir(parents=True, exist_ok=True)
        self.log("config", changed={k: list(v) for k, v in changes.items()}, forced=bool(blocking))

    def log(self, phase: str, **figures) -> None:
        """Append one line of figures (an epoch's, a step's, a phase's) to log.jsonl."""
        if not self.main:
            return
        record = {"time": round(time.time(), 3), "phase": phase, **figures}
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self, phase: str) -> Path:
        return self.path / f"{phase}.pt"

    def save(self, phase: str, state: dict) -> None:
        """Write a checkpoint atomically: a process killed during the save leaves the previous one."""
        if not self.main:
            return
        tmp = self.checkpoint(phase).with_suffix(".pt.tmp")
        state = {**state, STAMP: {"phase": phase, "config": json.loads(json.dumps(self.config.to_dict()))}}
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint(phase))

    def load(self, phase: str) -> dict | None:
        """The phase's checkpoint (None when there is none); RunError when it cannot be read, or
        was written by another phase or by a run with another config."""
        path = self.checkpoint(phase)
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, wrong file type...
            raise RunError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]}): it is "
                           f"truncated or corrupted; restore it, or delete it to run phase {phase!r} again") from None
        if not isinstance(state, dict):
            raise RunError(f"{path} holds a {type(state).__name__}, not a checkpoint of phase {phase!r}")
        self._check_stamp(path, phase, state.get(STAMP))
        return state

    def _check_stamp(self, path: Path, phase: str, stamp) -> None:
        """A checkpoint written by this code says which phase and config wrote it (older ones do not)."""
        if stamp is None:
            return
        if stamp.get("phase") != phase:
            raise RunError(f"{path} was written by phase {stamp.get('phase')!r}, not {phase!r}: a file was copied "
                           "or renamed into this run folder")
        current = json.loads(json.dumps(self.config.to_dict()))
        changes = config_changes(stamp.get("config", {}), current)
        blocking = {}
        for key, change in changes.items():
            section = key.split(".")[0]
            if section in _STRUCTURAL or (not self.reconfigure and phase in SECTION_PHASES.get(section, PHASE_FILES)):
                blocking[key] = change
        if blocking:
            lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} in this run" for k, (a, b) in blocking.items())
            raise RunError(f"{path} was written by a run with another config and cannot resume this one:\n{lines}\n"
                           "use the checkpoint's run folder, or delete the file to run the phase again")

    def require(self, phase: str) -> dict:
        state = self.load(phase)
        if state is None or not state.get("done"):
            raise RunError(f"phase {phase!r} has not finished in {self.path}; run it first")
        return state


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never part of one. The temporary file is this
    process's own: torchrun ranks all write the run's config.json at start, and with one shared
    name a rank's rename could find the file already moved by another's."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
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
