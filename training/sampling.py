"""Policies sampled to train the one-shot meta-graph (pre-training), as (N, cells, modules) booleans."""

from __future__ import annotations

import torch

from service.architecture import cheapest, mobilenet_v2
from service.manifest import SearchSpace


def drop_path_policy(n: int, space: SearchSpace, keep: float, generator: torch.Generator) -> torch.Tensor:
    """The paper's drop-path: every module kept independently with probability `keep`."""
    return torch.rand(n, space.num_cells, space.num_modules, generator=generator) < keep


def sparse_policy(n: int, space: SearchSpace, fixed_path_rows: float, generator: torch.Generator) -> torch.Tensor:
    """Each cell keeps k modules, k uniform in 0..M (k = 0 is an empty cell), chosen at random.

    Besides, a share of rows takes the cheapest path and another the MobileNetV2 path:
    those are the ends of the latency range the controller will explore, and paths this
    sparse are rare under independent drop-path (see the measured pitfall in docs/history/2026-11-28-first-default-bundle.md).
    """
    cells, modules = space.num_cells, space.num_modules
    k = torch.randint(0, modules + 1, (n, cells, 1), generator=generator)
    ranks = torch.rand(n, cells, modules, generator=generator).argsort(-1).argsort(-1)
    policy = ranks < k
    fixed = int(round(n * fixed_path_rows))
    if fixed:
        policy[:fixed] = torch.from_numpy(cheapest(space))
        policy[fixed : 2 * fixed] = torch.from_numpy(mobilenet_v2(space))
    return policy


def sandwich_policy(n: int, space: SearchSpace, generator: torch.Generator) -> torch.Tensor:
    """The second pass of a sandwich step: a quarter of the rows on the MobileNetV2 path, an
    eighth on the cheapest path, the rest on random sparse paths (every module count per
    cell equally likely, empty cells included)."""
    policy = sparse_policy(n, space, 0.0, generator)
    quarter, eighth = n // 4, n // 8
    policy[:quarter] = torch.from_numpy(mobilenet_v2(space))
    policy[quarter : quarter + eighth] = torch.from_numpy(cheapest(space))
    return policy
