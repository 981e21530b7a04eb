"""Several worker processes on one port (`INSTANAS_WORKERS` > 1), and the supervisor that keeps them.

The supervisor binds the listening socket once and starts the workers (spawned, not forked:
onnxruntime's threads do not survive a fork), each a whole server: it loads and verifies
every bundle itself, and the kernel hands each new connection to one of them. One process
serves requests on about one core (the executor threads share the GIL for everything but
onnxruntime's own work), so a machine with more cores serves more with more workers; the
measured table is in docs/RESULTS.md ("Process and thread model").

What is global and what is per worker:
- Metrics add up: the supervisor points prometheus_client's multiprocess mode at a folder
  (`INSTANAS_METRICS_DIR`, default a fresh folder in /dev/shm, a tmpfs, so a read-only root
  filesystem still works), each worker writes its values there, and `/metrics`, whichever
  worker answers it, reports the sum over all workers (gauges as service/metrics.py says:
  live sums, or the highest of one worker for the peaks). The folder is emptied at start,
  and a dead worker's live gauges are dropped.
- Reloads are global: `POST /admin/reload` reloads the worker that took it; on success it
  writes the folder it loaded to the supervisor's reload file and signals the supervisor
  (SIGUSR1), which sends SIGHUP to every other worker, and each reloads that folder. SIGHUP
  to the supervisor reloads every worker from the folder served now. A worker started later
  (after a crash) starts on that folder too.
- Limits are per worker: `INSTANAS_MAX_QUEUE`, `INSTANAS_MAX_CONCURRENCY`,
  `INSTANAS_MAX_CONNECTIONS`, `INSTANAS_MAX_BUFFERED_BYTES` and the fused cache hold for each
  process, so the server as a whole admits up to N times each, and holds N copies of the
  bundles in memory.
- Signals: SIGTERM to the supervisor is passed to every worker (each drains, then finishes
  its requests, service/server.py) and the supervisor exits once they have; SIGINT likewise.
  A worker that dies after it started is restarted; a worker that cannot start (a bundle
  that fails its checks: exit status 2) stops them all, and the supervisor exits 2.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("instanas.service")

RELOAD_FILE_ENV = "INSTANAS_RELOAD_FILE"  # set for the workers: where a reload's folder is written
RESTART_DELAY_S = 1.0  # before a crashed worker is started again
START_TIMEOUT_S = 600.0  # for a worker to load its bundles and answer


def metrics_folder(wanted: Path | None) -> Path:
    """An empty folder for the workers' metric files: `wanted`, or a new one on /dev/shm (tmpfs)."""
    if wanted is None:
        shm = Path("/dev/shm")
        return Path(tempfile.mkdtemp(prefix="instanas-metrics-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                     else None))
    wanted.mkdir(parents=True, exist_ok=True)
    for child in wanted.iterdir():  # values of an earlier run would be added to this one's
        if child.is_file() and child.suffix == ".db":
            child.unlink()
    return wanted


def reload_target(default: Path) -> Path:
    """The folder a worker serves: the last one reloaded by any worker, or `default`."""
    file = os.environ.get(RELOAD_FILE_ENV)
    if file and Path(file).is_file():
        try:
            return Path(json.loads(Path(file).read_text())["path"])
        except (ValueError, KeyError, OSError):
            log.warning("unreadable reload file %s, serving %s", file, default)
    return default


def announce_reload(path: Path) -> None:
    """Called by a worker after its own successful reload: every other worker reloads `path` too."""
    file = os.environ.get(RELOAD_FILE_ENV)
    if not file:
        return  # a single process: nothing else to tell
    tmp = Path(file).with_suffix(".tmp")
    tmp.write_text(json.dumps({"path": str(path), "pid": os.getpid()}))
    tmp.replace(file)
    os.kill(os.getppid(), signal.SIGUSR1)


def _worker(settings, sock: socket.socket, ready) -> None:
    """One worker process: a whole server on the supervisor's socket."""
    from service import logs

    logs.configure(settings.log_format, settings.log_level)
    from service import server
    from service.app import create_app
    from service.bundle import BundleError
    from service.cli import fast_server

    try:
        app = create_app(settings.model_copy(update={"model": reload_target(settings.model)}))
    except BundleError as exc:
        print(f"instanas-serve: cannot serve the bundle: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    ready.release()
    server.serve(app, settings, sockets=[sock], log_level=settings.log_level, access_log=False, log_config=None,
                 **fast_server())


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings):
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, multiprocessing.Process] = {}  # slot -> process
        self.stopping = False
        self.pending: list[int] = []  # signals seen by the handler, acted on by the loop

    def run(self) -> int:
        settings = self.settings
        own_folder = settings.metrics_dir is None
        folder = metrics_folder(settings.metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # inherited by the spawned workers
        os.environ[RELOAD_FILE_ENV] = str(folder / "reload.json")
        from prometheus_client import multiprocess

        self.multiprocess = multiprocess
        self.folder = folder
        sock = bind(settings.host, settings.port)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda s, _f: self.pending.append(s))
        log.info("supervisor %d: %d workers on http://%s:%d, metrics in %s", os.getpid(), settings.workers,
                 settings.host, sock.getsockname()[1], folder)
        try:
            for slot in range(settings.workers):
                if not self._start(slot, sock):
                    stopped = self.stopping  # a signal during start-up, not a failure
                    self._stop_all()
                    return 0 if stopped else 2
            while self.workers:
                self._act_on_signals()
                self._reap(sock)
                time.sleep(0.1)
            return 0
        finally:
            sock.close()
            if own_folder:
                shutil.rmtree(folder, ignore_errors=True)

    def _start(self, slot: int, sock: socket.socket) -> bool:
        """Start the worker of `slot`; False when it exits, or a stop is asked, before it is ready."""
        ready = self.context.Semaphore(0)
        process = self.context.Process(target=_worker, args=(self.settings, sock, ready), name=f"instanas-worker-{slot}",
                                       daemon=False)
        process.start()
        self.workers[slot] = process
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.acquire(timeout=0.2):
            self._act_on_signals()
            if not process.is_alive() or time.monotonic() > deadline or self.stopping:
                if not self.stopping:
                    log.error("worker %d (pid %s) did not start (exit status %s)", slot, process.pid,
                              process.exitcode)
                return False
        log.info("worker %d started (pid %d)", slot, process.pid)
        return True

    def _act_on_signals(self) -> None:
        while self.pending:
            sig = self.pending.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                self._signal_all(sig)
            elif sig == signal.SIGHUP:
                self._signal_all(signal.SIGHUP)
            elif sig == signal.SIGUSR1:  # a worker reloaded: the others follow
                try:
                    sender = json.loads(Path(os.environ[RELOAD_FILE_ENV]).read_text()).get("pid")
                except (ValueError, OSError):
                    sender = None
                self._signal_all(signal.SIGHUP, skip=sender)

    def _signal_all(self, sig: int, skip: int | None = None) -> None:
        for process in self.workers.values():
            if process.pid != skip and process.is_alive():
                os.kill(process.pid, sig)

    def _reap(self, sock: socket.socket) -> None:
        for slot, process in list(self.workers.items()):
            if process.is_alive():
                continue
            process.join()
            self.multiprocess.mark_process_dead(process.pid, str(self.folder))
            del self.workers[slot]
            if self.stopping:
                log.info("worker %d (pid %d) stopped", slot, process.pid)
                continue
            log.error("worker %d (pid %d) died (exit status %s); starting another", slot, process.pid,
                      process.exitcode)
            time.sleep(RESTART_DELAY_S)
            if not self._start(slot, sock) and not self.stopping:
                log.error("worker %d could not be started again; stopping", slot)
                self.stopping = True
                self._signal_all(signal.SIGTERM)

    def _stop_all(self) -> None:
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        for process in self.workers.values():
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        self.workers.clear()


def serve(settings) -> int:
    """Run `settings.workers` workers under a supervisor until SIGTERM; the exit status."""
    return Supervisor(settings).run()
