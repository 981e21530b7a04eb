"""`instanas-bench`: serving speed of a bundle against a static MobileNetV2, in one run.

    instanas-bench --model models/cifar10-default --data ../shared/data/cifar10-jpeg/test.tar.gz

(a) In-process batch-1 latency (p50, p99, mean) of `Executor.run` on real test images: the
    InstaNAS bundle (its default operating point, controller included) per block and with a
    warm fused-graph cache; the static MobileNetV2 bundle of the same width (`--baseline`, or,
    when none is given, a static view of the bundle's own module-0 blocks: the same graphs,
    so the same speed) through the same executor; and that MobileNetV2 as one fused graph
    run bare in onnxruntime.
(b) A real server (`instanas-serve` in a subprocess, loopback) under HTTP at concurrency
    1, 8 and 32 with real JPEGs: throughput, p50, p99, errors.
(c) The executor's overhead over the bare fused graph of the same architectures, and the
    fused cache's hit rate over the test images in the order they come.
(d) A table on stdout and every figure as JSON (`--json`); ratios, not absolute times, are
    what compare across machines.
(e) With `--naive`, (b) against the naive server (service/naive.py) of the static baseline:
    it, instanas-serve on the baseline and instanas-serve on the model, each level run on each
    in turn, `--rounds` times; every throughput as the median of its rounds' ratios to the
    naive server's (`paired`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from service import architecture, imaging
from service.bundle import load_bundle
from service.executor import Executor
from service.fused import FusedCache, GraphLibrary, build, split_key
from service.manifest import static_twin_folder, static_twin_name


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=1, file=sys.stderr)
    except ImportError:  # tqdm is a training dependency; the bench runs without it
        return iterable


def read_jpegs(path: Path, limit: int | None) -> list[bytes]:
    """Test images from a tar(.gz) of <class>/<image> files, or a folder of them, in a fixed order."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        data = [f.read_bytes() for f in files]
    else:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))),
                             key=lambda m: m.name)
            data = [tar.extractfile(m).read() for m in members]
    if limit:
        order = np.random.default_rng(0).permutation(len(data))[:limit]
        data = [data[i] for i in sorted(order)]
    return data


def static_view(bundle_dir: Path, out: Path, name: str | None = None) -> Path:
    """A static bundle of the module-0 path (MobileNetV2) of `bundle_dir`: the same stem, head and
    module-0 block files, a one-module search space and a fixed architecture; named `name`
    (default: the bundle's name + "-mobilenet_v2-view")."""
    manifest = load_bundle(bundle_dir).manifest
    space = manifest.search_space
    cells = [c.model_copy(update={"modules": c.modules[:1]}) for c in space.cells]
    static = manifest.model_copy(update={
        "name": name or static_twin_name(manifest.name) + "-view", "search_space": space.model_copy(update={"cells": cells}),
        "blocks": [b for b in manifest.blocks if b.module == 0], "controllers": [], "cascades": [], "networks": [],
        "default_controller": None,
        "fixed_architecture": "1" * space.num_cells, "frequent_architectures": [], "evaluation": None})
    out.mkdir(parents=True, exist_ok=True)
    for entry in static.files():
        (out / entry.file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle_dir / entry.file, out / entry.file)
    (out / "manifest.json").write_text(static.model_dump_json(indent=2))
    return out


def _stats(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_calls(fn, inputs: list[np.ndarray], desc: str, warmup: int = 30) -> dict:
    for x in inputs[:warmup]:
        fn(x)
    ms = np.empty(len(inputs))
    for i, x in enumerate(_progress(inputs, len(inputs), desc)):
        t0 = time.perf_counter()
        fn(x)
        ms[i] = (time.perf_counter() - t0) * 1e3
    return _stats(ms)


def in_process(model: Path, baseline: Path, inputs: list[np.ndarray]) -> dict:
    bundle = load_bundle(model)
    per_block = Executor(bundle)
    cache = FusedCache(bundle, size=32, min_count=3, builds_per_minute=1e9)
    cache.start()
    cache.warm([a.code for a in bundle.manifest.frequent_architectures])
    fused = Executor(bundle, fused=cache)
    for x in inputs:  # a warm server: its most frequent architectures are compiled
        fused.run(x[None])
    cache.wait_idle(600)
    cache.stop()  # no builds while timing: a warm server compiles nothing new

    static_bundle = load_bundle(baseline)
    static = Executor(static_bundle)
    static_cache = FusedCache(static_bundle, size=1, min_count=1, builds_per_minute=1e9)
    static_cache.start()
    static_cache.warm([static_bundle.manifest.fixed_architecture])
    static_cache.wait_idle(600)
    static_cache.stop()
    static_fused = Executor(static_bundle, fused=static_cache)
    space = static_bundle.manifest.search_space
    one_graph = build(GraphLibrary(static_bundle), space, np.ones((space.num_cells, 1), bool))
    out = {
        "instanas_per_block": time_calls(lambda x: per_block.run(x[None]), inputs, "instanas per-block"),
        "instanas_fused_cache": time_calls(lambda x: fused.run(x[None]), inputs, "instanas fused cache"),
        "mobilenet_v2_per_block": time_calls(lambda x: static.run(x[None]), inputs, "mobilenet_v2 per-block"),
        "mobilenet_v2_fused_cache": time_calls(lambda x: static_fused.run(x[None]), inputs, "mobilenet_v2 fused"),
        "mobilenet_v2_one_graph": time_calls(lambda x: one_graph(x[None]), inputs, "mobilenet_v2 one graph"),
    }
    # (c) the executor over the bare fused graph of the same architectures, and the hit rate
    cold = FusedCache(bundle, size=32, min_count=3, builds_per_minute=30)
    cold.start()
    cold_executor = Executor(bundle, fused=cold)
    for x in inputs:  # the cache fills as a server's would, from what it sees
        cold_executor.run(x[None])
    hits, misses = cold.stats.hits, cold.stats.misses
    cold.stop()
    # of the bundle's own graphs (a cascade's networks are timed through their stages, not here)
    graphs = {code: cache.get(code) for code in cache.codes() if split_key(code)[0] is None}
    chosen = [per_block.run(x[None]).executed[0] for x in inputs[:500]]
    given = [(x, m) for x, m in zip(inputs[:500], chosen) if architecture.encode(m) in graphs]
    if not given and graphs:  # a default point that runs none of them (a cascade): each cached one in turn
        codes = list(graphs)
        space = bundle.manifest.search_space
        given = [(x, architecture.decode(codes[i % len(codes)], space.num_cells, space.num_modules))
                 for i, x in enumerate(inputs[:500])]
    if given:
        executor_ms = time_calls(lambda xm: fused.run(xm[0][None], xm[1][None]), given, "executor, cached arch")
        bare_ms = time_calls(lambda xm: graphs[architecture.encode(xm[1])](xm[0][None]), given, "bare fused graph")
        out["executor_over_fused_graph"] = executor_ms["mean_ms"] / bare_ms["mean_ms"]
        out["executor_cached_architectures"] = executor_ms
        out["bare_fused_graphs"] = bare_ms
    out["fused_cache_hit_rate"] = hits / max(hits + misses, 1)
    for c in (cache, static_cache):
        c.stop()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 1.0) -> int:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


class _Server:
    """instanas-serve on `model` (with `env`), or with `naive` the naive server (service/naive.py)."""

    def __init__(self, model: Path, env: dict, naive: bool = False, workers: int = 1, command: list[str] | None = None):
        """`workers`: the naive server's processes (instanas-serve's come from INSTANAS_WORKERS in `env`);
        `command`: what to run instead of instanas-serve (it takes instanas-serve's options)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = Path(sys.executable).with_name("instanas-serve")
        command = [sys.executable, "-m", "service.naive", "--workers", str(workers)] if naive else command or [str(serve)]
        env = {**os.environ, "INSTANAS_ACCESS_LOG": "false", **env}
        self.process = subprocess.Popen([*command, "--model", str(model), "--host", "127.0.0.1", "--port",
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"instanas-serve exited with {self.process.returncode}")
            try:
                serving = int(env.get("INSTANAS_WORKERS", 1))
                if _get(self.url + "/healthz/ready") == 200 and (naive or serving == 1 or self._workers(env) >= serving):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("instanas-serve did not become ready")

    def _workers(self, env: dict) -> int:
        """Worker processes serving (instanas_workers): with several, each starts on its own."""
        import urllib.request

        from service.metrics import sample

        token = env.get("INSTANAS_API_TOKEN")
        request = urllib.request.Request(self.url + "/metrics",
                                         headers={"authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(sample(response.read().decode(), "instanas_workers"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _load(port: int, jpegs: list[bytes], concurrency: int, requests: int, on_body=None) -> dict:
    """`requests` POST /classify over `concurrency` kept-alive connections (one thread each);
    `on_body(bytes)` is given every answer's body."""
    import http.client
    import itertools
    import threading

    latencies, errors = [], [0]
    counter = itertools.count()
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while (i := next(counter)) < requests:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/classify", body=jpegs[i % len(jpegs)], headers={"content-type": "image/jpeg"})
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                latencies.append((time.perf_counter() - t0) * 1e3)
                errors[0] += not ok
                if on_body is not None and ok:
                    on_body(body)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "errors": errors[0],
            "throughput_rps": requests / wall, **_stats(np.array(latencies)), "latencies_ms": latencies}


def over_http(model: Path, jpegs: list[bytes], levels: tuple[int, ...], requests: int) -> list[dict]:
    server = _Server(model, {})
    try:
        _load(server.port, jpegs, 4, min(300, requests))  # warm-up: fills the fused cache
        out = []
        for c in levels:
            result = _load(server.port, jpegs, c, requests)
            print(f"HTTP concurrency {c}: {result['throughput_rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms, {result['errors']} errors", file=sys.stderr, flush=True)
            out.append({k: v for k, v in result.items() if k != "latencies_ms"})
        return out
    finally:
        server.stop()


def against_naive(model: Path, baseline: Path, jpegs: list[bytes], levels: tuple[int, ...], requests: int,
                  workers: int = 1, rounds: int = 1) -> dict:
    """The naive server (service/naive.py) on the static baseline, instanas-serve on the same bundle
    and on `model` with all its defaults (the access log included), `workers` processes each;
    `rounds` times, every level run on each server in turn: {name: [results by level]} (`paired`)."""
    served = {"INSTANAS_ACCESS_LOG": "true", "INSTANAS_WORKERS": str(workers)}
    servers = {"naive": _Server(baseline, {}, naive=True, workers=workers), "instanas_static": _Server(baseline, served),
               "instanas": _Server(model, served)}
    try:
        for server in servers.values():
            _load(server.port, jpegs, 4, min(300, requests))  # warm-up: fills the fused cache
        runs: dict[str, list[list[dict]]] = {name: [[] for _ in levels] for name in servers}
        for r in range(rounds):
            for i, c in enumerate(levels):
                for name, server in servers.items():
                    result = _load(server.port, jpegs, c, requests)
                    print(f"round {r + 1}/{rounds}: {name} at concurrency {c}: {result['throughput_rps']:.0f} req/s, "
                          f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, {result['errors']} errors",
                          file=sys.stderr, flush=True)
                    runs[name][i].append(result)
        return {name: [paired(by_level[i], runs["naive"][i]) for i in range(len(levels))]
                for name, by_level in runs.items()}
    finally:
        for server in servers.values():
            server.stop()


def paired(mine: list[dict], naive: list[dict]) -> dict:
    """One server's rounds at one level, each against the naive server's round run just before it:
    the median round's throughput, the latencies and errors of all rounds' requests together,
    every round's throughput, and `x_naive`, the median of the rounds' throughput ratios. A ratio
    of two runs side by side keeps its value when the machine slows down or speeds up between
    rounds, which a ratio of medians does not; many short rounds follow the drift closer."""
    ratios = [m["throughput_rps"] / n["throughput_rps"] for m, n in zip(mine, naive)]
    latencies = np.array([ms for m in mine for ms in m["latencies_ms"]])
    return {"concurrency": mine[0]["concurrency"], "requests": sum(m["requests"] for m in mine),
            "errors": sum(m["errors"] for m in mine), "throughput_rps": statistics.median(m["throughput_rps"] for m in mine),
            **_stats(latencies), "rounds": len(mine), "rounds_rps": [m["throughput_rps"] for m in mine],
            "x_naive": statistics.median(ratios), "x_naive_rounds": ratios}


def naive_table(compared: dict, workers: int = 1) -> str:
    processes = "one process each" if workers == 1 else f"{workers} processes each"
    rounds = compared["naive"][0]["rounds"]
    lines = [f"{'HTTP, ' + processes:<24} {'conc.':>5} {'req/s':>8} {'x naive':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'p99/p50':>8} {'errors':>7}"]
    for name, results in compared.items():
        for r in results:
            lines.append(f"{name:<24} {r['concurrency']:>5} {r['throughput_rps']:>8.0f} {r['x_naive']:>8.2f} "
                         f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p99_ms'] / r['p50_ms']:>8.2f} {r['errors']:>7}")
    if rounds > 1:
        lines.append(f"{rounds} rounds: req/s, the median round's; x naive, the median of the rounds' ratios; "
                     "latencies and errors, all rounds' requests")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = []
    ip = result.get("in_process")
    if ip:
        rows = [("in-process, batch 1", "p50 ms", "p99 ms", "mean ms")]
        for key in ("instanas_per_block", "instanas_fused_cache", "mobilenet_v2_per_block", "mobilenet_v2_fused_cache",
                    "mobilenet_v2_one_graph"):
            s = ip[key]
            rows.append((key, f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}", f"{s['mean_ms']:.3f}"))
        lines += [f"{a:<28} {b:>8} {c:>8} {d:>8}" for a, b, c, d in rows]
        lines.append(f"instanas / mobilenet_v2 (mean, fused cache both): "
                     f"{ip['instanas_fused_cache']['mean_ms'] / ip['mobilenet_v2_fused_cache']['mean_ms']:.2f}x")
        lines.append(f"instanas / mobilenet_v2 (mean, per block both): "
                     f"{ip['instanas_per_block']['mean_ms'] / ip['mobilenet_v2_per_block']['mean_ms']:.2f}x")
        if "executor_over_fused_graph" in ip:
            lines.append(f"Executor.run over the bare fused graph, cached architectures: "
                         f"{ip['executor_over_fused_graph']:.3f}x")
        lines.append(f"fused cache hit rate over the images in order: {ip['fused_cache_hit_rate']:.3f}")
    if result.get("http"):
        lines.append("")
        lines.append(f"{'HTTP concurrency':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for h in result["http"]:
            lines.append(f"{h['concurrency']:<18} {h['throughput_rps']:>8.0f} {h['p50_ms']:>8.2f} {h['p99_ms']:>8.2f} "
                         f"{h['errors']:>7}")
        first, last = result["http"][0], result["http"][-1]
        lines.append(f"throughput at {last['concurrency']} / at {first['concurrency']}: "
                     f"{last['throughput_rps'] / first['throughput_rps']:.2f}x; p99/p50 at {last['concurrency']}: "
                     f"{last['p99_ms'] / last['p50_ms']:.2f}" + (
                         f"; HTTP p50 at {first['concurrency']} minus in-process p50 (fused cache): "
                         f"{first['p50_ms'] - ip['instanas_fused_cache']['p50_ms']:.2f} ms" if ip else ""))
    if result.get("against_naive"):
        lines += ["", naive_table(result["against_naive"], result.get("workers", 1))]
    return "\n".join(lines).strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instanas-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/cifar10-default", type=Path)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="static MobileNetV2 bundle of the same width (default: <model>-mobilenet_v2 if it "
                             "exists, else a static view of the bundle's module-0 blocks)")
    parser.add_argument("--data", type=Path, required=True, help="test images: a tar(.gz) of <class>/<image> or a folder")
    parser.add_argument("--images", type=int, default=2000, help="images for the in-process figures")
    parser.add_argument("--requests", type=int, default=2000, help="HTTP requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32", help="HTTP concurrency levels, comma-separated")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    parser.add_argument("--naive", action="store_true",
                        help="HTTP against the naive server (service/naive.py) of the static baseline instead: it, "
                             "instanas-serve on the baseline and on the model, every figure a ratio to it")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --naive: processes of each server (INSTANAS_WORKERS; the naive server's --workers)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --naive: run every level on every server this many times in turn, and report "
                             "the median round and the median of the rounds' ratios to the naive server")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process part")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)

    jpegs = read_jpegs(args.data, None)
    manifest = load_bundle(args.model).manifest
    pre = manifest.preprocessing
    sample = [jpegs[i] for i in sorted(np.random.default_rng(0).permutation(len(jpegs))[: args.images])]
    inputs = [imaging.to_input(imaging.to_pixels(imaging.decode(b), pre.input_size), pre) for b in sample]
    with tempfile.TemporaryDirectory() as tmp:
        baseline = args.baseline
        sibling = static_twin_folder(args.model)
        if baseline is None:
            baseline = sibling if (sibling / "manifest.json").exists() else static_view(args.model, Path(tmp) / "static")
        result = {"model": str(args.model), "baseline": str(args.baseline or baseline),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}", "images": len(inputs)}
        if not args.no_in_process:
            result["in_process"] = in_process(args.model, baseline, inputs)
        levels = tuple(int(c) for c in args.concurrency.split(","))
        if args.naive:
            result["workers"] = args.workers
            result["rounds"] = args.rounds
            result["against_naive"] = against_naive(args.model, baseline, jpegs, levels, args.requests, args.workers,
                                                    args.rounds)
        elif not args.no_http:
            result["http"] = over_http(args.model, jpegs, levels, args.requests)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
