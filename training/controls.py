"""Which controller points the export serves: a point that runs several architectures must route
images better than chance, on the validation split.

A controller point that runs more than one architecture claims to choose per image. Its control
is the same routes dealt to the validation images at random (shuffled across images: the same
architectures, as often, so the same mean cost): the point is instance-aware only where its own
routes are more accurate than the shuffled ones by a paired bootstrap 95% interval above zero.
A point that is not is a random mix of static architectures at best, so the export leaves it out
of the bundle and says so (`training.controller_controls` in the manifest, FRONTIER.md); a point
that runs one architecture is a static network and is served as it is. The report measures the
same control again on the test split for every point the bundle serves.
"""

from __future__ import annotations

import numpy as np
import torch

from service import architecture
from training.context import Context
from training.evaluate import greedy
from training.stats import bootstrap_difference


@torch.no_grad()
def validation_control(ctx: Context, metagraph, controller) -> dict:
    """On validation: the point's distinct architectures, its top-1 and that of its routes shuffled
    across images, and the paired bootstrap of the difference (`point_minus_shuffled`)."""
    metagraph.eval()
    images, labels, policies = [], [], []
    for x, y in ctx.batches("val"):
        x = ctx.to_device(x)
        images.append(x)
        labels.append(y.to(ctx.device))
        policies.append(greedy(controller)(x))
    policy = torch.cat(policies)
    executed = architecture.apply_empty_cell_rule(policy.cpu().numpy(), ctx.space)
    figures = {"architectures": len(set(architecture.encode_many(executed)))}
    if figures["architectures"] < 2:
        return figures
    order = torch.from_numpy(np.random.default_rng(ctx.config.seed).permutation(len(policy))).to(policy.device)
    shuffled = policy[order]
    right, shuffled_right, start = [], [], 0
    for x, y in zip(images, labels):
        rows = slice(start, start + len(y))
        right.append((metagraph.forward_selected(x, policy[rows]).argmax(1) == y).cpu().numpy())
        shuffled_right.append((metagraph.forward_selected(x, shuffled[rows]).argmax(1) == y).cpu().numpy())
        start += len(y)
    right, shuffled_right = np.concatenate(right), np.concatenate(shuffled_right)
    return {**figures, "top1": float(right.mean()), "shuffled_top1": float(shuffled_right.mean()),
            "point_minus_shuffled": bootstrap_difference(right, shuffled_right, ctx.config.report.resamples,
                                                         ctx.config.seed)}


def instance_aware(figures: dict) -> bool:
    """A point runs one architecture, or its routes beat the shuffled ones (interval above zero)."""
    return figures["architectures"] < 2 or figures["point_minus_shuffled"]["low"] > 0


def served(verdicts: dict[str, dict], others: int, required: bool = True) -> list[str]:
    """The points to serve, in order: the instance-aware ones (all of them unless `required`); every
    one where none is and the bundle would have no operating point left (`others`: its cascades)."""
    keep = [name for name, figures in verdicts.items() if instance_aware(figures) or not required]
    return keep if keep or others else list(verdicts)


def check(ctx: Context, metagraph, points: dict) -> dict[str, dict]:
    """Each point's validation control, with `served` (whether the export keeps it) once decided by
    `served`; logged."""
    verdicts = {name: validation_control(ctx, metagraph, controller) for name, controller in points.items()}
    for name, figures in verdicts.items():
        if figures["architectures"] > 1:
            d = figures["point_minus_shuffled"]
            print(f"controller point {name}: {figures['architectures']} architectures on validation, "
                  f"top-1 {figures['top1']:.4f} against {figures['shuffled_top1']:.4f} with its routes shuffled "
                  f"({d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}])", flush=True)
    return verdicts
