"""Several worker processes on one port (`INSTANAS_WORKERS` > 1), and the supervisor that keeps them.

The supervisor binds the listening sockets and starts the workers (spawned, not forked:
onnxruntime's threads do not survive a fork), each a whole server: it loads and verifies
every bundle itself. Each worker listens on a socket of its own, all bound to the one port
with `SO_REUSEPORT` (`INSTANAS_REUSE_PORT`, on by default, on Linux), and Linux spreads new
connections across them by a hash of the client's address and port. With
one socket shared by all (the fallback), an asyncio server accepts every pending connection
each time the socket wakes it, so whichever worker woke first took a burst of keep-alive
connections (32 opened at once split 32/0 to 16/16 in docs/RESULTS.md), and the busier
worker set the tail. A worker's socket listens only once the worker serves, and a crashed
worker's socket is closed (connections queued on it but not yet accepted are reset), so new
connections reach only workers that can answer them. Sockets with `SO_REUSEPORT` only share
a port with sockets of the same user (Linux's rule), so another user's process cannot bind
into the group, and the supervisor first binds the port plainly, so that another server of
ours fails to start there rather than joining its group. One process
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
  its requests, service/server.py) and the supervisor exits 0 once they have; SIGINT (Ctrl+C)
  likewise but without the drain. The workers run in a process group of their own, so a
  terminal's Ctrl+C reaches them once, through the supervisor; under systemd use
  `KillMode=mixed` for the same reason (else every worker gets SIGTERM twice: no drain). A
  worker dies with the supervisor (Linux's parent-death signal). A worker that dies after it
  started is restarted; a worker that cannot start (a bundle that fails its checks) stops them
  all, and the supervisor exits 2. A worker still loading its bundles ignores SIGHUP; the
  supervisor sends it the reloads it missed once it is ready. Stopping, the supervisor closes
  its copies of the listening sockets at once, so that the port takes no more connections once
  the workers have closed theirs.
"""

from __future__ import annotations

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

from service.reload_file import RELOAD_FILE, RELOAD_FILE_ENV, read_reload, reload_target

log = logging.getLogger("instanas.service")

RESTART_DELAY_S = 1.0  # before a crashed worker is started again
START_TIMEOUT_S = 600.0  # for a worker to load its bundles and answer


def metrics_folder(wanted: Path | None) -> Path:
    """An empty folder for the workers' metric files: `wanted`, or a new one on /dev/shm (tmpfs)."""
    if wanted is None:
        shm = Path("/dev/shm")
        return Path(tempfile.mkdtemp(prefix="instanas-metrics-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                     else None))
    wanted.mkdir(parents=True, exist_ok=True)
    for child in wanted.iterdir():  # an earlier run's values would be added to this one's, its reload file obeyed
        if child.is_file() and (child.suffix in (".db", ".tmp") or child.name == RELOAD_FILE):
            child.unlink()
    return wanted


def _worker(settings, sock: socket.socket, ready) -> None:
    """One worker process: a whole server on the supervisor's socket."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the server handles it: a reload now would kill the worker
    os.setpgrp()  # a terminal's signals reach the supervisor only, which passes them on once
    _die_with_parent()
    from service import logs, server

    logs.configure(settings.log_format, settings.log_level)
    sys.exit(server.run(settings.model_copy(update={"model": reload_target(settings.model)}), sockets=[sock],
                     on_serving=ready.release))


def _die_with_parent() -> None:
    """SIGTERM this process when the supervisor dies (Linux prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bind(host: str, port: int, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port); listening unless `listen` is false (a worker's server
    then starts listening on it once it serves: asyncio's create_server does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings):
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, multiprocessing.Process] = {}  # slot -> process
        self.ready: set[int] = set()  # pids of the workers serving (a starting one may not be signalled)
        self.reloads = 0  # reloads passed on so far
        self.reloads_seen: dict[int, int] = {}  # pid -> `reloads` when it started
        self.stopping = False
        self.failed = False  # a worker could not be started again: exit 2
        self.pending: list[int] = []  # signals seen by the handler, acted on by the loop
        # Linux spreads connections across a port's SO_REUSEPORT sockets; macOS and the BSDs do not
        self.reuse_port = settings.workers > 1 and settings.reuse_port and sys.platform.startswith("linux")
        self.sockets: dict[int, socket.socket] = {}  # slot -> its listening socket (slot 0's for all without reuse_port)

    def run(self) -> int:
        settings = self.settings
        own_folder = settings.metrics_dir is None
        folder = metrics_folder(settings.metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # inherited by the spawned workers
        os.environ[RELOAD_FILE_ENV] = str(folder / RELOAD_FILE)
        from prometheus_client import multiprocess

        self.multiprocess = multiprocess
        self.folder = folder
        try:
            port = self._socket(0).getsockname()[1]
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
            if own_folder:
                shutil.rmtree(folder, ignore_errors=True)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda s, _f: self.pending.append(s))
        log.info("supervisor %d: %d workers on http://%s:%d (%s), metrics in %s", os.getpid(), settings.workers,
                 settings.host, port, "a socket each, SO_REUSEPORT" if self.reuse_port else "one shared socket", folder)
        try:
            for slot in range(settings.workers):
                if not self._start(slot):
                    stopped = self.stopping  # a signal during start-up, not a failure
                    self._stop_all()
                    return 0 if stopped else 2
            while self.workers:
                self._act_on_signals()
                self._reap()
                time.sleep(0.1)
            return 2 if self.failed else 0
        finally:
            for sock in self.sockets.values():
                sock.close()
            if own_folder:
                shutil.rmtree(folder, ignore_errors=True)

    def _start(self, slot: int) -> bool:
        """Start the worker of `slot` on its socket; False when it exits, or a stop is asked, before it is ready."""
        ready = self.context.Semaphore(0)
        try:
            sock = self._socket(slot)
        except OSError as exc:
            log.error("worker %d: cannot listen on %s:%d: %s", slot, self.settings.host, self.settings.port, exc)
            return False
        process = self.context.Process(target=_worker, args=(self.settings, sock, ready),
                                       name=f"instanas-worker-{slot}", daemon=False)
        process.start()
        self.workers[slot] = process
        self.reloads_seen[process.pid] = self.reloads
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.acquire(timeout=0.2):
            self._act_on_signals()
            if not process.is_alive() or time.monotonic() > deadline or self.stopping:
                self.reloads_seen.pop(process.pid, None)
                if not self.stopping:
                    log.error("worker %d (pid %s) did not start (exit status %s)", slot, process.pid,
                              process.exitcode)
                return False
        log.info("worker %d started (pid %d)", slot, process.pid)
        self.ready.add(process.pid)
        if self.reloads_seen.pop(process.pid) != self.reloads:  # reloads taken while it loaded: it reloads now
            os.kill(process.pid, signal.SIGHUP)
        return True

    def _socket(self, slot: int) -> socket.socket:
        """The socket of `slot`'s worker. With SO_REUSEPORT, each slot's is bound just before its
        worker starts, and only the first listens at once: the others listen when their worker
        serves, so until then the kernel queues no connection on them. A crashed worker's socket
        is closed (_reap) and its replacement gets a new one, so new connections go to the live
        workers meanwhile. Without it, one listening socket for all, kept across restarts."""
        slot = slot if self.reuse_port else 0
        if slot not in self.sockets:
            port = self.settings.port
            if self.sockets:
                port = next(iter(self.sockets.values())).getsockname()[1]
            elif self.reuse_port and port:  # a plain bind first: it fails, as it should, where another
                bind(self.settings.host, port).close()  # server (of SO_REUSEPORT sockets too) listens
            self.sockets[slot] = bind(self.settings.host, port, self.reuse_port, listen=not self.sockets)
        return self.sockets[slot]

    def _act_on_signals(self) -> None:
        while self.pending:
            sig = self.pending.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._stop(sig)
            elif sig == signal.SIGHUP:
                self.reloads += 1
                self._signal_all(signal.SIGHUP)
            elif sig == signal.SIGUSR1:  # a worker reloaded: the others follow
                self.reloads += 1
                done = read_reload() or {}
                self._signal_all(signal.SIGHUP, skip=done.get("pid"))

    def _signal_all(self, sig: int, skip: int | None = None) -> None:
        """`sig` to every worker but `skip`; a reload (SIGHUP) only to those serving (see _start)."""
        for process in self.workers.values():
            if process.pid == skip or not process.is_alive():
                continue
            if sig == signal.SIGHUP and process.pid not in self.ready:
                continue
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        for slot, process in list(self.workers.items()):
            if process.is_alive():
                continue
            process.join()
            self.multiprocess.mark_process_dead(process.pid, str(self.folder))
            self.ready.discard(process.pid)
            del self.workers[slot]
            if self.reuse_port and len(self.sockets) > 1:  # its queue closes; new connections go to the others
                self.sockets.pop(slot).close()
            if self.stopping:
                log.info("worker %d (pid %d) stopped", slot, process.pid)
                continue
            log.error("worker %d (pid %d) died (exit status %s); starting another", slot, process.pid,
                      process.exitcode)
            time.sleep(RESTART_DELAY_S)
            if not self._start(slot) and not self.stopping:
                log.error("worker %d could not be started again; stopping", slot)
                self.failed = True
                self._stop(signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        """`sig` to every worker, and the supervisor's copies of the listening sockets closed: a
        socket stays open while any process holds it, so one held here would go on taking new
        connections after its worker closed its own (having accepted what was queued), and they
        would be reset when the supervisor exits, their requests sent."""
        self.stopping = True
        self._signal_all(sig)
        for sock in self.sockets.values():
            sock.close()

    def _stop_all(self) -> None:
        if not self.stopping:  # else every worker was sent the signal already
            self._stop(signal.SIGTERM)
        for process in self.workers.values():
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        self.workers.clear()


def serve(settings) -> int:
    """Run `settings.workers` workers under a supervisor until SIGTERM; the exit status."""
    return Supervisor(settings).run()
