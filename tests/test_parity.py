"""The served ONNX path and the PyTorch meta-graph give the same logits for the same architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.architecture import apply_empty_cell_rule
from service.bundle import load_bundle
from service.executor import Executor
from tests.helpers import export_test_bundle
from training.searchspace import build_search_space, build_tiny_space

TOLERANCE = 1e-4


SPACES = {
    "tiny": build_tiny_space,
    "tiny-sum": lambda: build_tiny_space().model_copy(update={"combine": "sum"}),  # the paper's merge
    "paper-17x5-w0.25": lambda: build_search_space(width_multiplier=0.25),
}


@pytest.fixture(scope="module", params=list(SPACES))
def exported(request, tmp_path_factory):
    space = SPACES[request.param]()
    out = tmp_path_factory.mktemp(request.param)
    metagraph, controller, _ = export_test_bundle(out, space)
    return metagraph, controller, Executor(load_bundle(out))


def _policies(space, n: int, seed: int) -> np.ndarray:
    """Random per-row policies, with empty cells and all-module cells forced in."""
    rng = np.random.default_rng(seed)
    policy = rng.random((n, space.num_cells, space.num_modules)) < 0.5
    policy[:, 0] = False  # empty first cell: identity or fallback, by shape
    policy[:, -1] = True  # every module in the last cell
    policy[0, :, :] = False  # one row with every cell empty
    if n > 1:
        policy[1, :, :] = True  # one row with every module everywhere
    return policy


@pytest.mark.parametrize("batch", [1, 6])
def test_served_logits_equal_pytorch(exported, batch):
    metagraph, _, executor = exported
    space = metagraph.space
    x = torch.randn(batch, 3, space.input_size, space.input_size, generator=torch.Generator().manual_seed(batch))
    policy = _policies(space, batch, seed=batch)
    with torch.no_grad():
        masked = metagraph(x, torch.from_numpy(policy)).numpy()
        selected = metagraph.forward_selected(x, torch.from_numpy(policy)).numpy()
    served = executor.run(x.numpy(), executed=policy)
    assert np.array_equal(served.executed, apply_empty_cell_rule(policy, space))
    assert np.abs(served.logits - masked).max() < TOLERANCE
    assert np.abs(selected - masked).max() < TOLERANCE
    # Rows with different architectures really produce different outputs (the test would
    # not notice a policy that is ignored otherwise).
    if batch > 1:
        assert np.abs(masked[0] - masked[1]).max() > 1e-3


def test_rows_are_independent_of_the_batch(exported):
    """A row's logits do not depend on which other rows share its batch."""
    metagraph, _, executor = exported
    space = metagraph.space
    x = torch.randn(5, 3, space.input_size, space.input_size, generator=torch.Generator().manual_seed(7)).numpy()
    policy = _policies(space, 5, seed=7)
    together = executor.run(x, executed=policy).logits
    alone = np.concatenate([executor.run(x[i : i + 1], executed=policy[i : i + 1]).logits for i in range(5)])
    assert np.abs(together - alone).max() < TOLERANCE


def test_served_controller_chooses_what_pytorch_chooses(exported):
    metagraph, controller, executor = exported
    space = metagraph.space
    g = torch.Generator().manual_seed(3)
    # per-image brightness and colour shifts, as real images have (pure noise pools to the same features)
    x = torch.randn(8, 3, space.input_size, space.input_size, generator=g) + 2 * torch.randn(8, 3, 1, 1, generator=g)
    with torch.no_grad():
        expected = apply_empty_cell_rule((controller(x) >= 0.5).numpy(), space)
        logits = metagraph(x, torch.from_numpy(expected)).numpy()
    result = executor.run(x.numpy())
    assert np.array_equal(result.executed, expected)
    assert np.abs(result.logits - logits).max() < TOLERANCE
    # the controller really chooses: modules on and off, and not the same for every image
    assert 0.1 < expected.mean() < 0.9
    assert len({architecture_code.tobytes() for architecture_code in expected}) > 1


def test_static_bundle_serves_its_fixed_architecture(tmp_path):
    space = build_tiny_space()
    metagraph, _, manifest = export_test_bundle(tmp_path, space, with_controller=False)
    executor = Executor(load_bundle(tmp_path))
    x = torch.randn(3, 3, space.input_size, space.input_size)
    result = executor.run(x.numpy())
    assert manifest.controllers == [] and manifest.default_controller is None
    assert result.executed[:, :, 0].all() and not result.executed[:, :, 1:].any()
    with torch.no_grad():
        expected = metagraph(x, torch.from_numpy(result.executed)).numpy()
    assert np.abs(result.logits - expected).max() < TOLERANCE


def test_a_batch_on_one_architecture_equals_pytorch(exported):
    """Rows sharing one architecture take the executor's one-architecture path (as batch 1 does)."""
    metagraph, _, executor = exported
    space = metagraph.space
    x = torch.randn(4, 3, space.input_size, space.input_size, generator=torch.Generator().manual_seed(11))
    policy = np.repeat(_policies(space, 3, seed=11)[2:3], 4, axis=0)
    with torch.no_grad():
        expected = metagraph(x, torch.from_numpy(policy)).numpy()
    assert np.abs(executor.run(x.numpy(), executed=policy).logits - expected).max() < TOLERANCE
    assert np.abs(executor.run(x[:0].numpy(), executed=policy[:0]).logits).size == 0  # an empty batch still runs
