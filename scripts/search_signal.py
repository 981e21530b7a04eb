"""How well the search's accuracy signal ranks architectures, before and after a BatchNorm fix.

The search scores sampled architectures on the frozen pre-trained meta-graph. This script
takes random architectures around the MobileNetV2 path (where the search starts and samples)
and scores each three ways on the same validation images, comparing the first two with the
third by Spearman's rank correlation:

- `running`: eval-mode BatchNorm with the running statistics pre-training left (the mixture
  of every path the sandwich trained);
- `batch`: train-mode BatchNorm with momentum 0, so each batch normalises with its own
  statistics and nothing is written back;
- `reestimated`: running statistics recomputed for that one architecture on training images,
  as fine-tuning and the report do before judging a path: the reference.

    .venv/bin/python scripts/search_signal.py docs/runs/cifar10-taught --archs 24 --images 1000
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from service.architecture import apply_empty_cell_rule, mobilenet_v2
from training.batchnorm import batch_statistics, reestimate
from training.context import Context
from training.evaluate import evaluate, fixed_policy
from training.report import spearman
from training.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--archs", type=int, default=24)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64, help="the search's batch size")
    args = parser.parse_args()
    ctx = Context.open(RunDir(args.run), args.data)
    val = ctx.val.subset(args.images, 1)
    order = np.random.default_rng(1).permutation(len(val))  # batches of mixed classes, as the search's are
    ctx.val = type(val)(val.images[order], val.labels[order], val.classes, val.source)
    metagraph = ctx.new_metagraph()
    metagraph.load_state_dict(ctx.run.require("pretrain")["model"])
    metagraph.eval().requires_grad_(False)
    space, rng = ctx.space, np.random.default_rng(0)
    rows = []
    base = mobilenet_v2(space)
    for i in range(args.archs):
        # Where the search samples: the MobileNetV2 path with modules dropped (first half of the
        # architectures, up to 60% of its cells) or added (second half, up to 20% of the others).
        u = rng.random(base.shape)
        share = (i % (args.archs // 2) + 1) / (args.archs // 2)
        if i < args.archs // 2:
            matrix = base & (u >= 0.6 * share)
        else:
            matrix = base | (u < 0.2 * share)
        matrix = apply_empty_cell_rule(matrix[None], space)[0]
        policy = fixed_policy(matrix)
        running = evaluate(metagraph, ctx.batches("val", args.batch), policy)["top1"]
        with batch_statistics(metagraph):
            batch = _top1_in_train_mode(metagraph, ctx, args.batch, policy)
        model = copy.deepcopy(metagraph)
        reestimate(model, ctx.batches("train", seed=8000), lambda x, m=model, p=policy: m.forward_selected(
            ctx.to_device(x), p(x)), 2000)
        reference = evaluate(model, ctx.batches("val", args.batch), policy)["top1"]
        rows.append((int(matrix.sum()), running, batch, reference))
        print(f"{int(matrix.sum()):3d} modules  running {running:.3f}  batch {batch:.3f}  reestimated {reference:.3f}",
              flush=True)
    a = np.array(rows)
    half = args.archs // 2
    for name, part in (("all", a), ("modules dropped", a[:half]), ("modules added", a[half:])):
        print(f"{name} ({len(part)}): spearman vs reestimated: running {spearman(part[:, 1], part[:, 3]):.3f}, "
              f"batch {spearman(part[:, 2], part[:, 3]):.3f}; mean |error| running "
              f"{np.abs(part[:, 1] - part[:, 3]).mean():.3f}, batch {np.abs(part[:, 2] - part[:, 3]).mean():.3f}")


@torch.no_grad()
def _top1_in_train_mode(metagraph, ctx, batch_size, policy) -> float:
    # not `evaluate`: it puts the whole model in eval mode, undoing `batch_statistics`
    correct = total = 0
    for x, y in ctx.batches("val", batch_size):
        x = ctx.to_device(x)
        correct += (metagraph.forward_selected(x, policy(x)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / total


if __name__ == "__main__":
    main()
