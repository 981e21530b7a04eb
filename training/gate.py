"""A learned escalation gate: a small predictor, on the first stage's answer, of whether escalating pays.

A plain cascade escalates the images whose first-stage confidence (max softmax, top-2 margin) is
lowest. A learned gate reads more of what the first stage saw: its sorted probabilities, their
entropy and the class it named (some classes are confused more than others at low resolution),
and predicts, by logistic regression, whether the last stage would fix the image.

Its labels come only from images neither network trained on (the validation split), where the
first stage's errors are the ones it makes on unseen images (on training images it is right almost
always, and the labels would degenerate):

- escalation pays (1): the first stage is wrong and the last stage right;
- escalation does not (0): the first stage is right (the last stage could only cost, or undo it);
- left out: both wrong, since no stage answers them and they teach nothing about which does.

The gate is cross-fitted: the validation images are cut into `folds`; each fold's scores come from
the gate fitted on the other folds, so no image is scored by a gate that saw its own label, and a
cascade's threshold can then be fitted on those scores as on any confidence; the point serves that
threshold with the gate fitted on all of them. The two labels weigh alike in total, so that the gate
learns to rank images rather than to predict the common case; what an escalation costs enters where
the threshold is fitted, as for the plain confidences. The export compares it with the plain
confidences at every tolerance and keeps it only where it is cheaper at the same validation
accuracy (`compare`).
"""

from __future__ import annotations

import numpy as np

from service import cascade as serving
from training import cascade


def features(logits: np.ndarray) -> np.ndarray:
    """(N, 2 x classes + 2) float64: each row's probabilities sorted from the top, its entropy, its
    top-2 margin, and a one-hot of its top class, as the service computes them."""
    return serving.gate_features(*serving.exps(logits))


def labels(first_right: np.ndarray, last_right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, used) per image: 1 where the first stage is wrong and the last right, 0 where the first
    is right; `used` is False where both are wrong (left out)."""
    first_right, last_right = np.asarray(first_right, bool), np.asarray(last_right, bool)
    return (~first_right & last_right).astype(np.float64), first_right | last_right


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 25) -> np.ndarray:
    """Logistic regression weights (last: the bias), by Newton's method with an L2 penalty, the two
    labels weighted to equal totals. Features are standardised inside: the weights apply to raw `x`."""
    if len(np.unique(y)) < 2:
        raise ValueError("the gate needs images of both labels to learn from")
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    z = np.c_[(x - mean) / std, np.ones(len(x))]
    weight = np.where(y == 1, 0.5 / y.sum(), 0.5 / (len(y) - y.sum())) * len(y)
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2 * len(y))
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (z @ w)))
        gradient = z.T @ (weight * (p - y)) + penalty * w
        hessian = (z * (weight * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return np.r_[w[:-1] / std, w[-1] - (w[:-1] * mean / std).sum()]


def score(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The gate's probability that escalating pays, per row of raw features `x` (one minus the
    confidence the service computes, service.cascade.gate)."""
    return 0.5 * (1.0 + np.tanh(0.5 * (x @ w[:-1] + w[-1])))


def fit_all(x: np.ndarray, first_right: np.ndarray, last_right: np.ndarray) -> np.ndarray:
    """The gate fitted on every image's used label: what a cascade serves."""
    y, used = labels(first_right, last_right)
    return fit(x[used], y[used])


def cross_fitted(x: np.ndarray, first_right: np.ndarray, last_right: np.ndarray, folds: int = 5,
                 seed: int = 0) -> np.ndarray:
    """Every image's gate score from the gate fitted on the other folds' images (their used labels only)."""
    y, used = labels(first_right, last_right)
    fold = np.random.default_rng(seed).permutation(len(x)) % folds
    out = np.empty(len(x))
    for k in range(folds):
        train = (fold != k) & used
        out[fold == k] = score(fit(x[train], y[train]), x[fold == k])
    return out


def compare(first_logits: np.ndarray, first_right: np.ndarray, last_right: np.ndarray, floor: float,
            first_ms: float, last_ms: float, folds: int = 5, seed: int = 0) -> dict:
    """The plain confidences' and the cross-fitted gate's cheapest cascade holding `floor` (validation
    top-1) on these images (training.cascade.fit): {kind: {threshold, escalated, top1, latency_ms}}."""
    out = {}
    sure = {kind: cascade.confidence(kind, first_logits) for kind in cascade.CONFIDENCES}
    sure["gate"] = 1.0 - cross_fitted(features(first_logits), first_right, last_right, folds, seed)
    for kind, confidence in sure.items():
        threshold, escalated, top1 = cascade.fit(cascade.frontier(confidence, first_right, last_right), floor)
        out[kind] = {"threshold": threshold, "escalated": escalated, "top1": top1,
                     "latency_ms": first_ms + escalated * last_ms}
    return out
