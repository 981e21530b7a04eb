"""Cascades: a cheap first stage answers the images it is confident about, the rest escalate.

A two-stage cascade is (first, last, threshold): every image runs `first`; when its confidence
(`CONFIDENCES`, computed as service/cascade.py serves it) is at least the threshold, that answer
stands; otherwise the image also runs `last`, whose answer stands (blended, when `blend` > 0,
with the first stage's: the escalated image has paid for both). Its mean cost is cost(first) +
escalation rate x cost(last): the stages run at different resolutions, so the second reuses no
computation of the first.

Thresholds are fitted on held-out images, where the cascade's accuracy and cost at every
threshold that changes anything follow from per-image confidences and correctness alone
(`frontier`); `fit` takes the cheapest threshold from which on the accuracy stays above a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service import cascade as serving

CONFIDENCES = tuple(serving.CONFIDENCES)


def confidence(kind: str, logits: np.ndarray, gate=None) -> np.ndarray:
    """Each row's confidence of kind `kind` in its top class (a learned gate's: its weights `gate`),
    computed as the service computes it."""
    return serving.confidence(kind, logits, gate)


def blend(own: np.ndarray, previous: np.ndarray, share: float) -> np.ndarray:
    """A later stage's answer blending `share` of the previous stage's, computed as the service computes it."""
    return serving.blend(own, previous, share)


@dataclass(frozen=True)
class Frontier:
    """Every distinct cascade over one set of images, by rising threshold: from never escalating to
    always. Under `thresholds[i]` the images whose confidence is at least it stop at the first stage."""

    thresholds: np.ndarray  # +inf last: every image escalates
    escalated: np.ndarray  # share of the images that run the last stage
    top1: np.ndarray


def frontier(confidence: np.ndarray, first_correct: np.ndarray, last_correct: np.ndarray) -> Frontier:
    """The cascade's top-1 and escalation rate at each threshold where either changes: the distinct
    confidences (images tied at a confidence stop or escalate together), and +inf."""
    confidence = np.asarray(confidence, np.float64)
    n = len(confidence)
    if not (len(first_correct) == len(last_correct) == n) or n == 0:
        raise ValueError("confidence and correctness need one entry per image, and at least one image")
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    gain = np.asarray(first_correct, np.float64)[order] - np.asarray(last_correct, np.float64)[order]
    # k images answered first (the k most confident), k at the end of each run of equal confidences
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True]) + 1
    kept = np.r_[ends[::-1], 0]  # from all answered first to none
    cumulative = np.r_[0.0, np.cumsum(gain)]
    base = float(np.sum(last_correct))
    thresholds = np.r_[conf[ends[::-1] - 1], np.inf]
    return Frontier(thresholds=thresholds, escalated=1.0 - kept / n, top1=(base + cumulative[kept]) / n)


def fit(front: Frontier, floor: float) -> tuple[float, float, float]:
    """(threshold, escalation rate, top-1) of the cheapest cascade whose top-1 clears `floor` there
    and at every costlier threshold; else the most accurate (the cheapest of those).

    Escalating more never costs less, but on a few thousand held-out images top-1 wanders up and
    down by a few images along the frontier: the first threshold to touch the floor is often a
    lucky one, and on unseen images it escalates too few. The cheapest threshold after which the
    floor holds throughout is the one the held-out images support."""
    ok = front.top1 >= floor - 1e-12
    if ok[-1]:
        below = np.flatnonzero(~ok)
        i = int(below[-1]) + 1 if len(below) else 0
    else:  # out of reach: the most accurate, the least escalation among ties
        i = int(np.flatnonzero(front.top1 == front.top1.max())[0])
    return float(front.thresholds[i]), float(front.escalated[i]), float(front.top1[i])


def cheapest_pair(firsts: dict[str, tuple[np.ndarray, float]], lasts: dict[str, tuple[np.ndarray, float]],
                  labels: np.ndarray, floor: float, blends=(0.0,)) -> dict:
    """Of every first stage (`firsts`: name -> (logits, cost)), last stage (`lasts`, likewise),
    blend and confidence kind, the two-stage cascade `fit` finds cheapest with its top-1 at `floor`
    (the more accurate on a tie); a pair that cannot reach the floor only where none can. Returns
    {top1, latency_ms, escalated, confidence, threshold, blend, network (the last stage), first}."""
    best, key = None, None
    for start, (start_logits, start_ms) in firsts.items():
        start_right = start_logits.argmax(1) == labels
        for last, (last_logits, last_ms) in lasts.items():
            for share in blends:
                last_right = blend(last_logits, start_logits, share).argmax(1) == labels
                for kind in CONFIDENCES:
                    sure = confidence(kind, start_logits)
                    threshold, escalated, top1 = fit(frontier(sure, start_right, last_right), floor)
                    ms = start_ms + escalated * last_ms
                    candidate = (top1 < floor - 1e-12, ms, -top1)
                    if key is None or candidate < key:
                        key = candidate
                        best = {"top1": top1, "images": len(labels), "latency_ms": ms, "escalated": escalated,
                                "confidence": kind, "threshold": threshold, "blend": share, "network": last,
                                "first": start}
    return best


def apply(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Which images escalate under `threshold` (True: the last stage answers)."""
    return ~(np.asarray(confidence, np.float64) >= threshold)


@dataclass(frozen=True)
class Three:
    """A three-stage cascade fitted by `fit_three`: images whose first-stage confidence is below
    `thresholds[0]` run the second stage; of those, the ones whose second-stage confidence is below
    `thresholds[1]` run the third."""

    thresholds: tuple[float, float]
    escalated: tuple[float, float]  # the shares of all images that run the second stage, and the third
    top1: float
    mflops: float


def candidate_thresholds(confidence: np.ndarray, grid: int) -> np.ndarray:
    """`grid` quantiles of `confidence` within [0, 1], with 0 (no image escalates) and 1."""
    q = np.quantile(np.asarray(confidence, np.float64), np.linspace(0.0, 1.0, grid))
    return np.unique(np.r_[0.0, np.clip(q, 0.0, 1.0), 1.0])


def fit_three(first: np.ndarray, second: np.ndarray, right: np.ndarray, mflops, budget: float,
              grid: int = 41) -> Three | None:
    """The most accurate three-stage cascade whose mean MFLOPs stay within `budget` (the cheaper on
    a tie), over `grid` candidate thresholds for each stage: `first` and `second` are each image's
    confidence in the first and second stages' answers, `right` (3, N) whether each stage's answer
    (as the cascade gives it) is right, `mflops` each stage's cost. None where no pair fits the budget."""
    right = np.asarray(right, np.float64)
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if right.shape != (3, len(first)) or len(second) != len(first) or not len(first):
        raise ValueError("fit_three needs each stage's correctness and the first two confidences for every image")
    seconds = candidate_thresholds(second, grid)
    again = second[None, :] < seconds[:, None]  # (thresholds, images): would run the third stage if they reach it
    best = None
    for t1 in candidate_thresholds(first, grid):
        up = first < t1
        base = np.where(up, right[1], right[0])
        third = again & up[None, :]
        top1 = (base.sum() + (third * (right[2] - right[1])).sum(1)) / len(first)
        cost = mflops[0] + up.mean() * mflops[1] + third.mean(1) * mflops[2]
        for i in np.flatnonzero(cost <= budget + 1e-9):
            key = (round(float(top1[i]), 12), -float(cost[i]))
            if best is None or key > best[0]:
                best = (key, Three((float(t1), float(seconds[i])), (float(up.mean()), float(third[i].mean())),
                                   float(top1[i]), float(cost[i])))
    return None if best is None else best[1]
