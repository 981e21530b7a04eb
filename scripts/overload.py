"""Drive a real `instanas-serve` past its capacity and back, on loopback, and report.

Three phases of closed-loop clients (each sends its next request when the last one is answered):
`before` (a few clients, under capacity), `during` (many clients, far past it), `after` (a few
again). Every request is a real image. Reported per phase: sent, served (200), refused (503),
failed (anything else, transport errors included), p50/p99 latency of the served requests and p99
of the refusals as the clients saw them; for the run: the server's own time to refuse (from its
access log: p50, p99, max), its peak queue depth (instanas_queue_depth_peak) against
INSTANAS_MAX_QUEUE and its peak RSS (VmHWM) against the stated bound (docs/HOSTILE.md, "Memory").

    .venv/bin/python scripts/overload.py                     # the default bundle, printed as a table
    .venv/bin/python scripts/overload.py --json out.json     # and the figures as JSON

Bounded: about 20 s of load plus the server's start. tests/test_overload.py runs it and checks the
figures (every refusal an immediate 503 with Retry-After, no other error, the queue within its limit,
memory within the bound, latency back to where it was).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Server, metric  # noqa: E402 - a real server process on a free loopback port
from tests.hostile import memory_kib  # noqa: E402

MiB = 1 << 20
SETTINGS = {  # what is overloaded: one executor thread, a short queue
    "INSTANAS_MAX_CONCURRENCY": "1",
    "INSTANAS_MAX_QUEUE": "16",
    "INSTANAS_MAX_BATCH_SIZE": "8",
    "INSTANAS_MAX_BODY_BYTES": str(10 * MiB),
    "INSTANAS_MAX_BUFFERED_BYTES": str(64 * MiB),
    "INSTANAS_MAX_PIXELS": "40000000",
    "INSTANAS_MAX_CONNECTIONS": "1024",
    "INSTANAS_MAX_HEADER_BYTES": str(64 * 1024),
    # The access log (JSON) gives the server's own time for each refusal.
    "INSTANAS_ACCESS_LOG": "true",
    "INSTANAS_LOG_FORMAT": "json",
}
PHASES = (("before", 2, 4.0), ("during", 64, 8.0), ("after", 2, 4.0))  # (name, clients, seconds)


def memory_bound(settings: dict[str, str]) -> int:
    """RSS beyond the idle size, bytes: docs/HOSTILE.md, "Memory"."""
    s = {k.removeprefix("INSTANAS_").lower(): int(v) for k, v in settings.items() if v.isdigit()}
    return (2 * s["max_buffered_bytes"] + 6 * s["max_body_bytes"]
            + s["max_concurrency"] * (16 * s["max_pixels"] + 4 * MiB)
            + s["max_connections"] * (64 * 1024 + s["max_header_bytes"]))


def images(count: int = 16) -> list[bytes]:
    """Distinct 128x128 JPEGs (so controllers choose several architectures)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        base = rng.integers(0, 255, (1, 1, 3)) + rng.integers(-40, 40, (128, 128, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def phase(url: str, clients: int, seconds: float, bodies: list[bytes]) -> dict:
    records: list[tuple[int | str, float, bool]] = []  # (status or error, seconds, Retry-After present)
    deadline = time.monotonic() + seconds
    # One client (one connection) per worker: httpx's shared pool slows down badly past a few dozen
    # concurrent requests, which would measure the load generator instead of the server.
    async def worker(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            i = k
            while time.monotonic() < deadline:
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post("/classify", content=body, headers={"content-type": "image/jpeg"})
                    ok_refusal = r.status_code != 503 or (
                        r.headers.get("retry-after") == "1"
                        and r.json()["error"]["code"] in ("overloaded", "buffer_full"))
                    records.append((r.status_code, time.perf_counter() - t0, ok_refusal))
                except httpx.HTTPError as exc:
                    records.append((type(exc).__name__, time.perf_counter() - t0, False))

    await asyncio.gather(*(worker(k) for k in range(clients)))
    served = [s for code, s, _ in records if code == 200]
    refused = [s for code, s, _ in records if code == 503]
    return {
        "clients": clients, "seconds": seconds, "sent": len(records), "served": len(served), "refused": len(refused),
        "failed": sum(1 for code, _, _ in records if code not in (200, 503)),
        "refusals_without_retry_after": sum(1 for code, _, ok in records if code == 503 and not ok),
        "failures": sorted({str(code) for code, _, _ in records if code not in (200, 503)}),
        "p50_ms": _ms(percentile(served, 50)), "p99_ms": _ms(percentile(served, 99)),
        "refusal_p50_ms": _ms(percentile(refused, 50)), "refusal_p99_ms": _ms(percentile(refused, 99)),
        "served_per_s": round(len(served) / seconds, 1),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


def run(bundle: Path, settings: dict[str, str] | None = None, phases=PHASES, log: Path | None = None) -> dict:
    settings = {**SETTINGS, **(settings or {})}
    log = log or Path(tempfile.mkdtemp()) / "overload-server.log"
    bodies = images()
    srv = Server(bundle, log, **settings)
    try:
        # warm: every code path has run once, then the idle size R0
        asyncio.run(phase(srv.url, 2, 1.0, bodies))
        idle = memory_kib(srv.process.pid)["VmRSS"] * 1024
        results = {name: asyncio.run(phase(srv.url, clients, seconds, bodies)) for name, clients, seconds in phases}
        peak = memory_kib(srv.process.pid)["VmHWM"] * 1024
        queue_peak = metric(srv.url, "instanas_queue_depth_peak")
        alive = httpx.get(srv.url + "/healthz/ready", timeout=10).status_code
    finally:
        srv.stop()
    refusals = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("status") == 503 and record.get("path") == "/classify":
            refusals.append(record["duration_ms"] / 1e3)
    return {
        "server_refusal_ms": {"count": len(refusals), "p50": _ms(percentile(refusals, 50)),
                              "p99": _ms(percentile(refusals, 99)), "max": _ms(max(refusals, default=None))},
        "phases": results,
        "max_queue": int(settings["INSTANAS_MAX_QUEUE"]), "queue_depth_peak": queue_peak,
        "idle_rss_mib": round(idle / MiB, 1), "peak_rss_mib": round(peak / MiB, 1),
        "rss_bound_mib": round((idle + memory_bound(settings)) / MiB, 1),
        "ready_after": alive, "settings": settings,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), Python {platform.python_version()}",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(report: dict) -> str:
    rows = ["| phase | clients | sent | served | refused (503) | failed | served/s | p50 ms | p99 ms | refusal p99 ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["phases"].items():
        rows.append(f"| {name} | {r['clients']} | {r['sent']} | {r['served']} | {r['refused']} | {r['failed']} | "
                    f"{r['served_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['refusal_p99_ms'] or '-'} |")
    rows.append("")
    refusal = report["server_refusal_ms"]
    rows.append(f"server time to refuse: p50 {refusal['p50']} ms, p99 {refusal['p99']} ms, max {refusal['max']} ms "
                f"({refusal['count']} refusals); "
                f"queue depth peak {report['queue_depth_peak']:.0f} (limit {report['max_queue']}); "
                f"RSS idle {report['idle_rss_mib']} MiB, peak {report['peak_rss_mib']} MiB "
                f"(bound {report['rss_bound_mib']} MiB); ready afterwards: {report['ready_after']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar10-default"), help="bundle folder")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    report = run(Path(args.model))
    print(f"{args.model} on {report['machine']}")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
