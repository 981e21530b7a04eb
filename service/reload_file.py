"""The reload file: how one worker's reload reaches the others (service/workers.py).

With several worker processes, the worker that took a reload writes the folder it now serves to
the file named by `INSTANAS_RELOAD_FILE` (JSON: path, pid) and signals the supervisor, which
sends SIGHUP to every other worker; each then reloads the folder the file names, and a worker
started later (after a crash) serves it from the start.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("instanas.service")

RELOAD_FILE_ENV = "INSTANAS_RELOAD_FILE"  # set for the workers: where a reload's folder is written (JSON: path, pid)
RELOAD_FILE = "reload.json"


def read_reload() -> dict | None:
    """The reload file's {"path", "pid"}: the last reload any worker took; None when there is none."""
    file = os.environ.get(RELOAD_FILE_ENV)
    if not file or not Path(file).is_file():
        return None
    try:
        return json.loads(Path(file).read_text())
    except (ValueError, OSError):
        log.warning("unreadable reload file %s", file)
        return None


def reload_target(default: Path) -> Path:
    """The folder a worker serves: the last one reloaded by any worker, or `default`."""
    done = read_reload()
    return Path(done["path"]) if done and "path" in done else default


def announce_reload(path: Path) -> None:
    """Called by a worker after its own successful reload: every other worker reloads `path` too."""
    file = os.environ.get(RELOAD_FILE_ENV)
    if not file:
        return  # a single process: nothing else to tell
    try:
        tmp = Path(file).with_suffix(f".{os.getpid()}.tmp")  # one per worker: two reloads at once do not collide
        tmp.write_text(json.dumps({"path": str(path), "pid": os.getpid()}))
        tmp.replace(file)
        os.kill(os.getppid(), signal.SIGUSR1)
    except OSError as exc:  # this worker did reload; the others keep what they serve
        log.error("could not pass the reload on to the other workers: %s", exc)
