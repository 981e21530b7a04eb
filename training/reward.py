"""The InstaNAS reward: a quadratic latency reward between bounds, paid only when correct."""

from __future__ import annotations

import torch


def latency_reward(latency: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """1 at the middle of [lower, upper], 0 at either bound and outside it."""
    half = (upper - lower) / 2
    return ((upper - latency) * (latency - lower) / (half * half)).clamp(min=0)


def reward(correct: torch.Tensor, latency: torch.Tensor, lower: float, upper: float,
           pos_weight: float, neg_weight: float) -> torch.Tensor:
    """R = R_lat * pos_weight where the prediction is right, neg_weight where it is wrong."""
    return torch.where(correct, latency_reward(latency, lower, upper) * pos_weight,
                       torch.full_like(latency, neg_weight))


def upper_bound(epoch: int, epochs: int, start: float, end: float) -> float:
    """The dynamic upper bound falls linearly from `start` (first epoch) to `end` (last)."""
    return start + (end - start) * epoch / max(epochs - 1, 1)
