"""Measure a bundle through the service's own executor (onnxruntime, no torch).

Decodes every image of a split with the service's decoder, classifies it at batch 1
with the controller's architecture, and prints top-1 accuracy, the architectures'
estimated cost, and the measured executor time per image; then the same images on
static MobileNetV2 (module 0 everywhere) in the same bundle, for the ratio.

    .venv/bin/python scripts/evaluate_bundle.py --model models/cifar10-default \
        --data ../shared/data/cifar10-jpeg/test.tar.gz [--limit 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import architecture, imaging  # noqa: E402
from service.bundle import load_bundle  # noqa: E402
from service.executor import Executor  # noqa: E402


def read_split(path: Path, classes: list[str], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))),
                         key=lambda m: m.name)
        if limit:
            rng = np.random.default_rng(0)
            members = [members[i] for i in sorted(rng.permutation(len(members))[:limit])]
        for m in members:
            images.append(tar.extractfile(m).read())
            labels.append(classes.index(Path(m.name).parent.name))
    return images, np.array(labels)


def run(executor: Executor, inputs: list[np.ndarray], executed: np.ndarray | None = None):
    predictions, seconds, matrices = [], [], []
    for x in inputs:
        t0 = time.perf_counter()
        result = executor.run(x[None], None if executed is None else executed[None])
        seconds.append(time.perf_counter() - t0)
        predictions.append(int(result.logits[0].argmax()))
        matrices.append(result.executed[0])
    return np.array(predictions), np.array(seconds), np.array(matrices)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a tar(.gz) of <class>/<image> files")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a random subset of this many images")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    bundle = load_bundle(args.model)
    manifest = bundle.manifest
    executor = Executor(bundle)
    costs = architecture.CostTable.of_manifest(manifest)
    raw, labels = read_split(Path(args.data), manifest.classes, args.limit)
    pre = manifest.preprocessing
    inputs = [imaging.to_input(imaging.to_pixels(imaging.decode(b), pre.input_size), pre) for b in raw]
    run(executor, inputs[:50])  # warm-up

    pred, seconds, matrices = run(executor, inputs)
    static = architecture.mobilenet_v2(manifest.search_space)
    pred_static, seconds_static, _ = run(executor, inputs, static)
    codes, counts = np.unique([architecture.encode(m) for m in matrices], return_counts=True)
    figures = {
        "bundle": manifest.name, "version": manifest.version, "images": len(labels),
        "top1": float((pred == labels).mean()),
        "mean_estimated_latency_ms": float(costs.latency_ms(matrices, manifest.default_controller).mean()),
        "mean_mflops": float(costs.mflops(matrices, manifest.default_controller).mean()),
        "mean_modules_executed": float(matrices.sum((1, 2)).mean()),
        "distinct_architectures": len(codes),
        "most_common_architectures": {str(c): int(n) for c, n in sorted(zip(codes, counts), key=lambda t: -t[1])[:5]},
        "executor_ms_p50": float(np.median(seconds) * 1e3),
        "executor_ms_mean": float(seconds.mean() * 1e3),
        "executor_ms_p99": float(np.percentile(seconds, 99) * 1e3),
        "mobilenet_v2_path_top1": float((pred_static == labels).mean()),
        "mobilenet_v2_path_executor_ms_p50": float(np.median(seconds_static) * 1e3),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
