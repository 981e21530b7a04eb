"""Paired comparisons of two classifiers over the same images."""

from __future__ import annotations

import numpy as np


def bootstrap_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of mean(a) - mean(b) over the same images: the difference and its 95% interval."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high), "resamples": resamples}
