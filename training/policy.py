"""The policy-gradient pieces of the controller search, as small functions with hand-checked tests.

Per image the controller gives p, one probability per (cell, module). Exploration mixes in
the opposite choice, p' = alpha p + (1 - alpha)(1 - p), and a policy is sampled from
Bernoulli(p'); the greedy policy is p >= threshold. The loss is the self-critical REINFORCE
estimate, -sum(log pi(a)) * (R(sampled) - R(greedy)), minus an entropy bonus, averaged over
the batch.
"""

from __future__ import annotations

import torch

_EPS = 1e-6


def explore(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """p' = alpha p + (1 - alpha)(1 - p): with alpha < 1 every choice keeps a chance to flip."""
    return alpha * p + (1 - alpha) * (1 - p)


def annealed(start: float, end: float, step: int, steps: int) -> float:
    """Linear from `start` at step 0 to `end` at the last step."""
    return start + (end - start) * min(step, steps - 1) / max(steps - 1, 1)


def log_prob(p: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log pi(action) under independent Bernoulli(p), summed per image: (N, cells, modules) -> (N,)."""
    p = p.clamp(_EPS, 1 - _EPS)
    return torch.where(action, p.log(), (1 - p).log()).sum((1, 2))


def entropy(p: torch.Tensor, kind: str = "bernoulli") -> torch.Tensor:
    """Per image (N,): "bernoulli" is -p log p - (1-p) log(1-p), largest at p = 0.5, the greedy
    threshold; "one_sided" is the authors' -p log p, largest at p = 1/e, so its bonus does not
    drag every module towards a coin flip."""
    p = p.clamp(_EPS, 1 - _EPS)
    terms = -p * p.log()
    if kind == "bernoulli":
        terms = terms - (1 - p) * (1 - p).log()
    elif kind != "one_sided":
        raise ValueError(f"unknown entropy {kind!r}")
    return terms.sum((1, 2))


def loss(p_explore: torch.Tensor, action: torch.Tensor, advantage: torch.Tensor, beta: float,
         entropy_kind: str = "bernoulli") -> torch.Tensor:
    """[-sum_i log pi(a_i) * advantage_i - beta * sum_i entropy(p'_i)] / N."""
    n = p_explore.shape[0]
    return (-(log_prob(p_explore, action) * advantage.detach()) - beta * entropy(p_explore, entropy_kind)).sum() / n
