"""Where a request's time goes in instanas-serve, native frames included: py-spy samples a real server under load.

    .venv/bin/python scripts/profile_request_path.py --data ../shared/data/cifar10-jpeg/test.tar.gz \
        [--model models/cifar10-default-mobilenet_v2] [--concurrency 1,32] [--requests 20000] [--rate 50] [--gil]

Starts instanas-serve on the bundle with its defaults (access log on, as `instanas-bench --naive`
runs it), warms it up, then for each concurrency level records the server with
`py-spy record --native --format raw` while the benchmark's load generator (service/bench.py) sends
real test JPEGs over loopback. py-spy leaves out most threads that wait (idle); every other
sample of every server thread is put in the part of its innermost frame that belongs to one
(numpy's and the interpreter's own frames count for whatever called them):

- waiting: a thread blocked on a lock or a condition that py-spy did not leave out (an executor
  thread waiting for a batch, a thread waiting for the interpreter's lock);
- onnxruntime: the graphs running (its native frames and `InferenceSession.run`);
- decode: Pillow and service/imaging.py (bytes to the model's input);
- access log: the logging module and service/logs.py;
- metrics: prometheus_client and service/metrics.py;
- HTTP and event loop: uvicorn, httptools, uvloop, asyncio, Starlette, FastAPI, and the
  connection guard (service/server.py);
- request path: the rest of service/ (envelope, fast path, admission, batcher, executor's
  bookkeeping, softmax, the response);
- other: a sample with none of these (threads of the interpreter or of libraries alone).

The table gives each part's microseconds a request (samples / rate / requests) and its share of
the samples that are not waiting. py-spy stops the server for each sample to unwind its native
frames, so the rate is kept low (50 a second: the server then keeps most of its speed) and the
run long; the shares, not the microseconds, are what compare with other runs. It needs to
attach to another process (ptrace): run as root, or with kernel.yama.ptrace_scope 0.

`--gil`: sample only the thread holding the interpreter's lock (`py-spy record --gil`, Python
frames alone, 200 samples a second): the parts of the time the lock is held, which is what one
process's threads take turns at. A part's native call made holding the lock counts for the
Python frame that made it (a socket write by uvloop counts for "HTTP and event loop").
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from service.bench import _load, _Server, read_jpegs  # noqa: E402

# (part, what a frame's text holds), tried in this order on each frame, from the sampled one outwards
PARTS = (
    ("waiting", ("PyThread_acquire_lock_timed", "pthread_cond_wait", "pthread_cond_timedwait", "take_gil",
                 "epoll_wait", "_queue_SimpleQueue_get")),
    ("onnxruntime", ("onnxruntime",)),
    ("decode", ("PIL/", "service/imaging.py")),
    ("access log", ("logging/__init__.py", "service/logs.py")),
    ("metrics", ("prometheus_client/", "service/metrics.py")),
    ("HTTP and event loop", ("uvicorn/", "httptools", "uvloop", "asyncio/", "starlette/", "fastapi/",
                             "service/server.py")),
    ("request path", ("service/",)),
)
ORDER = [*(part for part, _ in PARTS), "other"]


def part_of(frames: list[str]) -> str:
    """The part of one sample: `frames`, from the outermost to the sampled one."""
    for frame in reversed(frames):
        for part, marks in PARTS:
            if any(mark in frame for mark in marks):
                return part
    return "other"


def read_raw(path: Path) -> collections.Counter:
    """Samples by part, from py-spy's raw output (a line a stack: frames joined by `;`, then a count)."""
    parts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            parts[part_of(stack.split(";"))] += int(count)
    return parts


def profile(server: _Server, jpegs: list[bytes], concurrency: int, requests: int, rate: int, py_spy: str,
            folder: Path, gil: bool = False) -> dict:
    out = folder / f"c{concurrency}.txt"
    spy = subprocess.Popen([py_spy, "record", "--gil" if gil else "--native", "--rate", str(rate), "--format", "raw",
                            "--output", str(out), "--pid", str(server.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached
    if spy.poll() is not None:
        raise SystemExit(f"py-spy could not record: {spy.stderr.read().decode(errors='replace').strip()}")
    result = _load(server.port, jpegs, concurrency, requests)
    spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
    _, err = spy.communicate(timeout=60)
    if not out.exists():
        raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace').strip()}")
    parts = read_raw(out)
    busy = sum(n for part, n in parts.items() if part != "waiting") or 1
    return {"concurrency": concurrency, "requests": requests, "errors": result["errors"],
            "throughput_rps": result["throughput_rps"], "samples": dict(parts),
            "us_per_request": {part: parts[part] / rate / requests * 1e6 for part in ORDER},
            "share_of_busy": {part: parts[part] / busy for part in ORDER if part != "waiting"}}


def table(levels: list[dict]) -> str:
    head = "| part | " + " | ".join(f"c={lv['concurrency']} us/request | c={lv['concurrency']} share of busy"
                                      for lv in levels) + " |"
    rows = [head, "|" + " --- |" * (1 + 2 * len(levels))]
    for part in ORDER:
        cells = []
        for lv in levels:
            share = lv["share_of_busy"].get(part)
            cells += [f"{lv['us_per_request'][part]:.0f}", "" if share is None else f"{100 * share:.1f}%"]
        rows.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10-default-mobilenet_v2")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rate", type=int,
                        help="samples a second; default 50 (unwinding native frames pauses the server: at 200 it "
                             "served a tenth), 200 with --gil")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the interpreter's lock")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rate = args.rate or (200 if args.gil else 50)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed (it is in the dev extra: make install-dev)")
    jpegs = read_jpegs(args.data, 500)
    server = _Server(args.model, {"INSTANAS_ACCESS_LOG": "true"})
    try:
        _load(server.port, jpegs, 4, 300)  # warm-up: the fused cache filled
        with tempfile.TemporaryDirectory() as folder:
            levels = [profile(server, jpegs, int(c), args.requests, rate, py_spy, Path(folder), args.gil)
                      for c in args.concurrency.split(",")]
    finally:
        server.stop()
    print(table(levels))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rate": rate, "gil": args.gil, "levels": levels},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
