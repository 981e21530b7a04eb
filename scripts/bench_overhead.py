"""Where the time goes between the executor and the HTTP answer, and what the serving changes buy.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_overhead.py [--model models/cifar10-default] [--skip-http]

Part 1, in process (medians of many calls): decoding one JPEG, the executor at batch 1 (per
block and fused), one thread hop (Starlette's run_in_threadpool, the batcher's own pool; under
asyncio and uvloop), and rendering a response (the previous pydantic path: build the model,
validate and dump it as FastAPI does; the new path: a dict and orjson).

Part 2, over HTTP with ApacheBench (`ab`, Debian's apache2-utils; keep-alive, one real JPEG):
the request path before this change (service/ files of --baseline-ref for the files this
change touched, the rest as in the working tree) and after it, each under asyncio + h11 and
uvloop + httptools. Every server is a real uvicorn process on the same bundle; runs alternate
on the same machine, so compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The files of the request path this change rewrote; the baseline takes them from --baseline-ref.
CHANGED = ["app.py", "classification.py", "executor.py", "state.py", "metrics.py", "schemas.py", "settings.py",
           "cli.py", "routes/classify.py"]
NEW = ["fused.py", "batching.py"]


def median_us(fn, repeats: int) -> float:
    from scripts.bench_fused import median_ms  # one timing loop for both scripts

    return median_ms(fn, repeats) * 1e3


def a_jpeg(data_dir: Path) -> bytes:
    with tarfile.open(data_dir / "test.tar.gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("/cat/0000.jpg"):
                return tar.extractfile(member).read()
    raise SystemExit(f"no cat/0000.jpg in {data_dir / 'test.tar.gz'}")


def in_process(model: str, jpeg: bytes) -> None:
    import orjson
    import uvloop
    from pydantic import TypeAdapter
    from starlette.concurrency import run_in_threadpool

    from service import architecture, classification, fused, imaging
    from service.bundle import load_bundle
    from service.executor import Executor
    from service.operating_points import Choice
    from service.schemas import (
        Architecture,
        CellChoice,
        ClassifyResponse,
        ClassScore,
        Latency,
        ModelRef,
        OperatingPointChoice,
    )

    bundle = load_bundle(model)
    manifest, space = bundle.manifest, bundle.manifest.search_space
    pre = manifest.preprocessing
    x = imaging.to_input(imaging.to_pixels(imaging.decode(jpeg), pre.input_size), pre)[None]
    executor = Executor(bundle)
    result = executor.run(x)
    library = fused.GraphLibrary(bundle)
    graph = fused.build(library, space, result.executed[0])
    rows = []
    rows.append(("decode + resize + normalise one JPEG", median_us(
        lambda: imaging.to_input(imaging.to_pixels(imaging.decode(jpeg), pre.input_size), pre), 300)))
    rows.append(("executor.run, batch 1, per-block path", median_us(lambda: executor.run(x), 300)))
    rows.append(("  its backbone as one fused graph", median_us(lambda: graph(x), 300)))

    def noop():
        return None

    pool = ThreadPoolExecutor(2)

    async def hops(n: int = 2000):
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(n):
            await run_in_threadpool(noop)
        t1 = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(pool, noop)
        t2 = time.perf_counter()
        return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6

    a = asyncio.run(hops())
    u = uvloop.run(hops())
    rows.append(("thread hop: run_in_threadpool (asyncio / uvloop)", f"{a[0]:.1f} / {u[0]:.1f}"))
    rows.append(("thread hop: loop.run_in_executor (asyncio / uvloop)", f"{a[1]:.1f} / {u[1]:.1f}"))

    costs = architecture.CostTable.of_manifest(manifest) if hasattr(architecture.CostTable, "of_manifest") \
        else architecture.CostTable(manifest)

    class FakeState:
        pass

    state = FakeState()
    state.metrics = __import__("service.metrics", fromlist=["Metrics"]).Metrics().model(manifest.name, space.num_cells,
                                                                                         space.num_modules)
    state.costs, state.manifest = costs, manifest
    state.model_ref = ModelRef(name=manifest.name, version=manifest.version, sha256=bundle.sha256)
    state.model_json = state.model_ref.model_dump()
    state.module_names = [[m.name for m in c.modules] for c in space.cells]
    choice = Choice(manifest.default_controller, "default")
    request = classification.Request(jpeg, choice, 5, time.perf_counter())
    stages = {"decode": 1e-3, "queue": 0.0, **result.seconds}
    adapter = TypeAdapter(ClassifyResponse)

    def old_render():  # the previous respond(): pydantic models, then FastAPI's validate + dump_json
        executed = result.executed[0]
        probs = result.probabilities[0]
        order = np.argsort(-probs, kind="stable")[:5]
        scores = [ClassScore(index=int(i), label=manifest.classes[i], probability=float(probs[i])) for i in order]
        ms = float(costs.latency_ms(executed[None], choice.operating_point)[0])
        mf = float(costs.mflops(executed[None], choice.operating_point)[0])
        body = ClassifyResponse(
            model=state.model_ref, prediction=scores[0], top_k=scores,
            architecture=Architecture(code=architecture.encode(executed),
                                      cells=[CellChoice(cell=c.index, modules=[c.modules[m].name for m in
                                                                               np.flatnonzero(executed[c.index])])
                                             for c in space.cells],
                                      modules_executed=int(executed.sum()), mflops=round(mf, 4),
                                      estimated_latency_ms=round(ms, 4), relative_to_baseline=round(ms / costs.baseline_ms, 4)),
            operating_point=OperatingPointChoice(name=choice.operating_point, reason=choice.reason),
            latency_ms=Latency(**{k: round(v * 1e3, 4) for k, v in stages.items()}, total=1.0))
        state.metrics.batch_size.observe(1)  # the metrics the previous respond() observed too
        state.metrics.observe_architecture(executed, ms, mf)
        state.metrics.operating_points.labels(choice.operating_point or "", choice.reason).inc()
        for stage, seconds in stages.items():
            state.metrics.stage_duration.labels(stage).observe(seconds)
        return adapter.dump_json(adapter.validate_python(body))

    def new_render():
        return orjson.dumps(classification.respond(state, result, 0, request, stages, 0.0, 1))

    def new_render_json():
        import json

        return json.dumps(classification.respond(state, result, 0, request, stages, 0.0, 1)).encode()

    rows.append(("render: pydantic + validate + dump_json, incl. metrics (before)", median_us(old_render, 500)))
    rows.append(("render: dict + orjson, incl. metrics (after)", median_us(new_render, 500)))
    rows.append(("render: dict + json.dumps, incl. metrics", median_us(new_render_json, 500)))
    print("in process, median per call (us):")
    for name, value in rows:
        print(f"  {name:<58} {value if isinstance(value, str) else f'{value:.1f}'}")


def baseline_tree(ref: str) -> Path:
    """A copy of the working tree's service/ with this change's files as they are at `ref`."""
    root = Path(tempfile.mkdtemp(prefix="instanas-baseline-"))
    shutil.copytree(ROOT / "service", root / "service", ignore=shutil.ignore_patterns("__pycache__"))
    for name in CHANGED:
        text = subprocess.run(["git", "show", f"{ref}:service/{name}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        if name == "state.py" and "of_manifest" in (ROOT / "service" / "architecture.py").read_text():
            text = text.replace("CostTable(bundle.manifest)", "CostTable.of_manifest(bundle.manifest)")
        (root / "service" / name).write_text(text)
    for name in NEW:
        (root / "service" / name).unlink(missing_ok=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: Path, model: str, loop: str, http: str, log: Path, env: dict[str, str],
          log_level: str = "info") -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import uvicorn; from service.app import create_app; "
            f"from service.settings import Settings; "
            f"uvicorn.run(create_app(Settings(model={model!r})), host='127.0.0.1', port={port}, loop={loop!r}, "
            f"http={http!r}, log_level={log_level!r})")
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tempfile.gettempdir(), env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def ab(url: str, body: Path, n: int, c: int, csv: Path) -> dict[str, float]:
    out = subprocess.run(["ab", "-q", "-k", "-n", str(n), "-c", str(c), "-p", str(body), "-T", "image/jpeg",
                          "-e", str(csv), url + "/classify"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))
    # ab counts a body whose length differs from the first one's as failed ("Length"): ours carry
    # timings, so only connection, receive, exception failures and non-2xx answers are errors here
    kinds = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out)
    failed = sum(int(k) for k in kinds.groups()) if kinds else 0
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    pct = {int(a): float(b) for a, b in (line.split(",") for line in csv.read_text().splitlines()[1:])}
    return {"rps": rps, "p50": pct[50], "p99": pct[99], "failed": failed + (int(non2xx.group(1)) if non2xx else 0)}


def scrape(url: str, name: str) -> float:
    from service.metrics import sample  # summed over the `model` label (absent before the repository)

    return sample(httpx.get(url + "/metrics").text, name)


def over_http(model: str, jpeg: bytes, ref: str, n1: int, n8: int, rounds: int) -> None:
    if shutil.which("ab") is None:
        print("over HTTP: skipped (no `ab`; apt-get install apache2-utils)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="instanas-bench-"))
    body = tmp / "cat.jpg"
    body.write_bytes(jpeg)
    base = baseline_tree(ref)
    off = {"INSTANAS_FUSED_CACHE_SIZE": "0"}
    configs = [("before", base, "asyncio", "h11", {}), ("before", base, "uvloop", "httptools", {}),
               ("after, no fusion, batch 1", ROOT, "uvloop", "httptools", {**off, "INSTANAS_MAX_BATCH_SIZE": "1"}),
               ("after, no fusion", ROOT, "uvloop", "httptools", off),
               ("after", ROOT, "asyncio", "h11", {}), ("after", ROOT, "uvloop", "httptools", {}),
               ("after, no access log", ROOT, "uvloop", "httptools", {"log_level": "warning"})]
    print(f"over HTTP (ab -k, one JPEG, so one architecture; c=1: {n1} requests, c=8: {n8}; best of {rounds} "
          f"round(s)); latency ms from ab; mean batch = the server's instanas_batch_size sum/count after c=8")
    print(f"  {'code':<27}{'loop/http':<19}{'c=1 req/s':>10}{'p50':>7}{'p99':>7}{'c=8 req/s':>11}{'p50':>7}{'p99':>7}"
          f"{'batch':>7}{'errors':>7}")
    best: dict[int, dict] = {}
    for _ in range(rounds):
        for i, (label, root, loop, http, env) in enumerate(configs):
            env = dict(env)
            level = env.pop("log_level", "info")  # uvicorn's access log is on at info
            proc, url = serve(root, model, loop, http, tmp / f"{i}.log", env, level)
            try:
                for _ in range(50):  # warm-up (after the change: also the fused graph of this image's architecture)
                    httpx.post(url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"})
                time.sleep(0.5)
                one = ab(url, body, n1, 1, tmp / "c1.csv")
                count0, sum0 = scrape(url, "instanas_batch_size_count"), scrape(url, "instanas_batch_size_sum")
                eight = ab(url, body, n8, 8, tmp / "c8.csv")
                batch = (scrape(url, "instanas_batch_size_sum") - sum0) / (scrape(url, "instanas_batch_size_count") - count0)
            finally:
                proc.terminate()
                proc.wait(10)
            row = {"one": one, "eight": eight, "batch": batch}
            if i not in best or one["rps"] + eight["rps"] > best[i]["one"]["rps"] + best[i]["eight"]["rps"]:
                best[i] = row
    for i, (label, _, loop, http, _) in enumerate(configs):
        one, eight = best[i]["one"], best[i]["eight"]
        print(f"  {label:<27}{loop + '/' + http:<19}{one['rps']:>10.0f}{one['p50']:>7.2f}{one['p99']:>7.2f}"
              f"{eight['rps']:>11.0f}{eight['p50']:>7.2f}{eight['p99']:>7.2f}{best[i]['batch']:>7.2f}"
              f"{one['failed'] + eight['failed']:>7}")
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar10-default"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--baseline-ref", default="HEAD")
    parser.add_argument("--requests", type=int, default=200, help="requests at concurrency 1 (twice that at 8)")
    parser.add_argument("--rounds", type=int, default=1, help="HTTP rounds; the best of them is shown")
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    jpeg = a_jpeg(Path(args.data))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    in_process(args.model, jpeg)
    if not args.skip_http:
        over_http(args.model, jpeg, args.baseline_ref, args.requests, 2 * args.requests, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
