"""Dynamic batching across requests.

Requests hand their job to a `Batcher` on the event loop. Whenever an executor worker is
free, the batcher gives it up to `max_batch_size` queued jobs at once; the worker (a thread
of the batcher's own pool, one hop from the loop and one back per batch) decodes what is still
encoded (small JPEGs were decoded on the loop, service/classification.py), runs and answers
them all. A batch is held back only while it is not full AND other admitted
requests are still arriving (reading their bodies), and never longer than `max_batch_delay`
after its oldest job was queued: a request to an idle server runs at once.

Each job learns how long it waited: `queue_s` while every worker was busy, `batch_s` while a
worker was free but the batch was held to gather more jobs.

A job may carry several images (`size`, a multi-image request): `max_batch_size` counts images,
and a job is never split, so a job larger than `max_batch_size` runs as one batch of its own.

An idle batcher (no worker running, nothing queued or arriving) runs a job that `inline(job)`
accepts at once on the event loop's own thread: the two thread hand-offs cost more than a
small model's compute on these machines (measured: an undecodable 1-byte request took 0.64
ms against 0.20 ms for a GET /healthz/live, nearly all of it the hops). The loop is blocked
meanwhile, so the service accepts only the only request in progress, and a small one
(service/classification.py): under load, blocking the loop serialised everything (measured:
throughput at concurrency 32 fell from 750 to 490 req/s when any idle moment ran inline).
Requests that arrive while a job runs there wait in the kernel's buffers, outside admission
control, for at most that one job's time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service.errors import ApiError, retry_after


@dataclass(eq=False)
class Job:
    """One request's work; `payload` is whatever the process function needs."""

    payload: Any
    size: int = 1  # images (rows) it carries
    t_submit: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0
    batch_s: float = 0.0
    batch_size: int = 0  # images in the batch it ran in
    future: asyncio.Future | None = None
    result: Any = None


class Batcher:
    """Gathers jobs into batches for `workers` threads running `process(jobs) -> outcomes`.

    `process` returns one outcome per job, in order: an exception instance is raised in that
    job's request, anything else is its result. If `process` itself raises, every job of the
    batch gets that exception. `on_dispatch(size)` / `on_done(size)` / `on_queue(delta)` are
    metric hooks, called on the loop.
    """

    def __init__(self, process: Callable[[list[Job]], list[Any]], *, workers: int, max_batch_size: int,
                 max_batch_delay_s: float, on_dispatch: Callable[[int], None] | None = None,
                 on_done: Callable[[int], None] | None = None, on_queue: Callable[[int], None] | None = None,
                 max_queue: int | None = None, inline: Callable[[Job], bool] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        """`max_queue`: with this many jobs queued, a batch is no longer held for requests still
        arriving, so the queue stays within the limit admission control enforces
        (service.classification.admit). `inline(job)`: whether an idle batcher may run `job` on the
        loop's thread (default: never). `clock`: what jobs' waits and the batch delay are measured on,
        in seconds (the delay's timer only says when to look again); a test passes a clock it moves
        by hand, so that those waits come out exact."""
        self.process = process
        self._clock = clock
        self.inline = inline
        self.max_queue = max_queue
        self.workers, self.max_batch_size, self.max_batch_delay_s = workers, max(1, max_batch_size), max_batch_delay_s
        self._on_dispatch, self._on_done, self._on_queue = on_dispatch, on_done, on_queue
        self._queue: deque[Job] = deque()
        self._queued_rows = 0  # images of the queued jobs
        self._free = workers
        self._free_since = 0.0  # when a worker last became free after all were busy
        self._arriving = 0  # admitted requests not yet submitted (reading their body)
        self._timer: asyncio.TimerHandle | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- state for admission control ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Every worker is running a batch."""
        return self._free == 0

    @property
    def free(self) -> int:
        """Workers not running a batch."""
        return self._free

    @property
    def arriving(self) -> int:
        """Admitted requests (`expect`) that have not submitted their job yet."""
        return self._arriving

    @property
    def idle(self) -> bool:
        """Nothing admitted, queued or running."""
        return not self._queue and self._arriving == 0 and self._free == self.workers

    # --- the request side (event loop) ----------------------------------------------------------------

    def expect(self) -> None:
        """A request was admitted and will submit a job (or `cancel`) soon: while any are
        expected, a batch that is not full may wait for them (up to the delay)."""
        self._arriving += 1

    def cancel(self) -> None:
        """An expected request ended without submitting (e.g. a bad body)."""
        self._arriving -= 1
        self._dispatch()

    async def run(self, payload: Any, *, expected: bool = True, size: int = 1) -> Job:
        """Queue a job of `size` images and wait for its outcome; returns the finished job, whose
        `result` attribute holds the outcome. `expected`: this request called `expect()` before."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        job = Job(payload, size=max(1, size), t_submit=self._clock())
        job.future = loop.create_future()
        if expected:
            self._arriving -= 1
        self._queue.append(job)
        self._queued_rows += job.size
        if self._on_queue:
            self._on_queue(1)
        self._dispatch()
        job.result = await job.future
        return job

    def _dispatch(self) -> None:
        if self._closed:  # a retired batcher starts no new threads: what is still queued is refused
            while self._queue:
                job = self._queue.popleft()
                self._queued_rows -= job.size
                if self._on_queue:
                    self._on_queue(-1)
                if not job.future.done():
                    job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down or reloading; "
                                                      "retry", retry_after()))
            return
        while self._queue and self._free > 0:
            now = self._clock()
            if self._queued_rows < self.max_batch_size and self._arriving > 0 and self.max_batch_delay_s > 0 \
                    and (self.max_queue is None or len(self._queue) < self.max_queue):
                wait = self._queue[0].t_submit + self.max_batch_delay_s - now
                if wait > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(wait, self._on_timer)
                    return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, rows = [], 0
            while self._queue and (not batch or rows + self._queue[0].size <= self.max_batch_size):
                batch.append(self._queue.popleft())
                rows += batch[-1].size
            self._queued_rows -= rows
            for job in batch:
                waited = now - job.t_submit
                job.batch_s = max(0.0, now - max(job.t_submit, self._free_since))
                job.queue_s = max(0.0, waited - job.batch_s)
                job.batch_size = rows
            inline = (len(batch) == 1 and self._free == self.workers and not self._queue and self._arriving == 0
                      and self._inline_ok(batch[0]))
            self._free -= 1
            if self._on_queue:
                self._on_queue(-len(batch))
            if self._on_dispatch:
                self._on_dispatch(len(batch))
            if inline:
                self._finished(batch, _run_now(self.process, batch))
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="instanas-executor")
            future = self._loop.run_in_executor(self._pool, self.process, batch)
            future.add_done_callback(lambda f, batch=batch: self._finished(batch, f))

    def _inline_ok(self, job: Job) -> bool:
        if self.inline is None:
            return False
        try:
            return bool(self.inline(job))
        except Exception:  # noqa: BLE001 - a failing check must not lose the batch: the threads take it
            return False

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _finished(self, batch: list[Job], future: asyncio.Future) -> None:
        self._free += 1
        if self._free == 1:
            self._free_since = self._clock()
        if self._on_done:
            self._on_done(len(batch))
        try:
            outcomes = future.result()
            if len(outcomes) != len(batch):
                raise RuntimeError(f"process returned {len(outcomes)} outcomes for {len(batch)} jobs")
        except BaseException as exc:  # noqa: BLE001 - handed to every request of the batch
            outcomes = [exc] * len(batch)
        for job, outcome in zip(batch, outcomes):
            if job.future.done():  # the request was cancelled (client gone)
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        self._dispatch()

    def close(self) -> None:
        """Stop the worker threads once their batches end (at shutdown); later batches are refused."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _run_now(process: Callable, batch: list[Job]) -> asyncio.Future:
    """`process(batch)` run here, its outcome (or exception) as a finished future, as a worker's would be."""
    future = asyncio.get_running_loop().create_future()
    try:
        future.set_result(process(batch))
    except BaseException as exc:  # noqa: BLE001 - handed to every request of the batch, as from a worker
        future.set_exception(exc)
    return future
