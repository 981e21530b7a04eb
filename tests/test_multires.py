"""Resolution in the search space: switchable batch norms, the `multires` phase, and its
architectures at a lower resolution served as cascade first stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service import architecture
from service.bundle import load_bundle
from service.cascade import pool
from service.executor import Executor
from service.manifest import Preprocessing
from training import switchable
from training.bundle_writer import write_bundle
from training.evaluate import evaluate, fixed_policy
from training.metagraph import MetaGraph
from training.multires import MultiResolution
from training.searchspace import build_tiny_space

from .helpers import assert_trained_apart_per_resolution, randomise, unit_table


def _model(seed: int = 0) -> MultiResolution:
    torch.manual_seed(seed)
    model = MultiResolution(MetaGraph(build_tiny_space(10, 32)), (16, 32))
    return randomise(model, seed)  # every batch-norm copy its own statistics and weights, as training gives


def test_each_resolution_runs_with_its_own_batch_norms_and_shared_convolutions():
    model = _model()
    norms = [m for m in model.modules() if isinstance(m, switchable.SwitchableBatchNorm2d)]
    assert norms and all(len(m.norms) == 2 for m in norms)
    plain = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert plain == 2 * len(norms), "every batch norm is a copy inside a switchable one"
    x = torch.randn(6, 3, 32, 32)
    path = fixed_policy(np.ones((model.space.num_cells, model.space.num_modules), bool))(x)
    with torch.no_grad():
        low, high = model.forward_selected(x, path)
        # the 16x16 answer: the shared convolutions on the pooled input, through the first copies
        with switchable.use(model.metagraph, 0):
            assert torch.equal(low, model.metagraph.forward_selected(torch.nn.functional.avg_pool2d(x, 2), path))
        with switchable.use(model.metagraph, 1):
            assert torch.equal(high, model.metagraph.forward_selected(x, path))
            # the other copy gives another answer: the norms are not shared
            other = model.metagraph.forward_selected(torch.nn.functional.avg_pool2d(x, 2), path)
        assert not torch.allclose(other, low)
    assert all(m.active == 0 for m in norms), "use() restores the copy that was active"
    with pytest.raises(IndexError, match="copy 2 of 2"):
        switchable.select(model, 2)


def test_collapse_gives_a_plain_network_at_one_resolution():
    """A resolution's plain meta-graph (what is exported) answers exactly as the model at that resolution."""
    model = _model(1)
    space16 = build_tiny_space(10, 16)
    x = torch.randn(5, 3, 32, 32)
    code_matrix = np.random.default_rng(0).random((model.space.num_cells, model.space.num_modules)) < 0.5
    path = fixed_policy(code_matrix)(x)
    plain = model.plain(16, space16)
    assert set(plain.state_dict()) == set(MetaGraph(space16).state_dict())  # load_state_dict was strict
    with torch.no_grad():
        expected = model.at(16).forward_selected(x, path)
        assert torch.equal(plain.forward_selected(torch.nn.functional.avg_pool2d(x, 2), path), expected)
        assert torch.equal(model.plain(32, model.space).forward_selected(x, path), model.at(32).forward_selected(x, path))


def test_a_view_at_one_resolution_keeps_the_models_mode():
    model = _model()
    assert not model.at(16).training
    evaluate(model.at(16), [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))],
             fixed_policy(np.ones((model.space.num_cells, model.space.num_modules), bool)))
    assert not model.training, "evaluating a view leaves an eval-mode model in eval mode"
    assert model.train().at(32).training


def test_the_cheapest_pair_of_first_and_last_stages_by_hand():
    """Two first stages: `cheap` costs 1 and is right on images 0-3 of 8, `twin` costs 3 and right on
    0-5; the last stage (cost 10) is right on all. Confidence is highest on the images a first stage
    gets right. At a floor of 1.0 `cheap` escalates 4 images (1 + 0.5 x 10 = 6 ms) and `twin` 2
    (3 + 0.25 x 10 = 5.5 ms): the twin wins; at 0.75 the twin needs no escalation (3 ms) where `cheap`
    needs 2 images' (1 + 0.25 x 10 = 3.5 ms); at 0.5 `cheap` alone holds it (1 ms). A first stage that
    cannot reach the floor loses to one that can, however cheap."""
    from training.cascade import cheapest_pair

    labels = np.zeros(8, np.int64)

    def logits(right: int) -> np.ndarray:
        out = np.zeros((8, 2))
        out[:right, 0] = np.linspace(6, 5, right)  # sure and right
        out[right:, 1] = 0.5  # unsure and wrong
        return out

    firsts = {"cheap": (logits(4), 1.0), "twin": (logits(6), 3.0)}
    lasts = {"base": (logits(8), 10.0)}
    best = cheapest_pair(firsts, lasts, labels, 1.0)
    assert (best["first"], best["network"], best["top1"], best["escalated"]) == ("twin", "base", 1.0, 0.25)
    assert best["latency_ms"] == pytest.approx(5.5)
    best = cheapest_pair(firsts, lasts, labels, 0.75)
    assert (best["first"], best["escalated"], best["latency_ms"]) == ("twin", 0.0, 3.0)
    best = cheapest_pair({"cheap": firsts["cheap"]}, lasts, labels, 0.5)
    assert (best["first"], best["escalated"], best["latency_ms"]) == ("cheap", 0.0, 1.0)
    # the last stage wrong everywhere: only the twin reaches 0.7 (6 of 8 right without escalating)
    lasts = {"base": (np.tile([0.0, 1.0], (8, 1)), 10.0)}
    best = cheapest_pair(firsts, lasts, labels, 0.7)
    assert (best["first"], best["top1"]) == ("twin", 0.75)


def test_an_architecture_at_a_lower_resolution_serves_as_pytorch_runs_it(tmp_path):
    """Exported as a network of its own (a static bundle at 16x16), the architecture's answer through
    the service's executor equals the multi-resolution model's at 16x16 to 1e-5."""
    model = _model(2)
    space16 = build_tiny_space(10, 16)
    matrix = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 0]], bool)[:, : model.space.num_modules]
    matrix = np.resize(matrix, (model.space.num_cells, model.space.num_modules))
    code = architecture.encode(matrix)
    write_bundle(tmp_path, model.plain(16, space16), {}, unit_table(space16), name=f"n-{code}", version="0",
                 dataset="none", classes=[f"c{i}" for i in range(10)], fixed_architecture=code,
                 preprocessing=Preprocessing(input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3))
    x = np.random.default_rng(3).standard_normal((7, 3, 32, 32)).astype(np.float32)
    served = Executor(load_bundle(tmp_path)).run(pool(x, 16)).logits
    with torch.no_grad():
        t = torch.from_numpy(x)
        expected = model.at(16).forward_selected(t, fixed_policy(matrix)(t)).numpy()
    assert np.abs(served - expected).max() < 1e-5


def test_multires_trains_the_metagraph_at_each_resolution(smoke_run):
    state = torch.load(smoke_run / "multires.pt", weights_only=False)
    [epoch] = state["curve"]  # the smoke preset: one epoch
    assert {"val_top1_mobilenet_v2_16", "val_top1_cheapest_16", "val_top1_mobilenet_v2_32", "val_top1_cheapest_32"} <= set(epoch)
    # the validation evidence for a resolution's own batch norms against the full resolution's re-estimated
    assert {"val_top1_mobilenet_v2_16_own", "val_top1_mobilenet_v2_16_shared", "val_top1_cheapest_16_own",
            "val_top1_cheapest_16_shared"} <= set(state["figures"])
    finetuned = torch.load(smoke_run / "finetune.pt", weights_only=False)["model"]
    assert_trained_apart_per_resolution(state["model"], finetuned, "finetune")


def test_the_search_space_lists_its_resolutions_and_first_stages_may_come_from_it(smoke_run):
    m = load_bundle(smoke_run / "bundle").manifest
    assert m.search_space.resolutions == [16, 32]
    assert load_bundle(smoke_run / "bundle-mobilenet_v2").manifest.search_space.resolutions == []
    tried = list(m.training["first_stages"])  # every first stage the export tried, with its validation figures
    space = m.search_space
    fixed = [architecture.encode(architecture.mobilenet_v2(space)), architecture.encode(architecture.cheapest(space))]
    assert tried[:4] == ["mobilenet_v2@16", "mobilenet_v2-shared@16", *(f"{code}@16" for code in fixed)], \
        "the twin, the shared-weight twin, then the meta-graph's MobileNetV2 and cheapest paths at 16x16, at least"
    assert all(0 <= f["top1"] <= 1 and f["latency_ms"] > 0 for f in m.training["first_stages"].values())
    report = json.loads((smoke_run / "report" / "report.json").read_text())
    assert report["first_stages"] == m.training["first_stages"]
    assert set(report["multires"]) >= {"val_top1_mobilenet_v2_16_own", "val_top1_mobilenet_v2_16_shared"}
    assert "First stages" in (smoke_run / "report" / "FRONTIER.md").read_text()
    validation = m.training["validation"]
    for point in m.cascades[:-1]:
        first = point.stages[0]
        assert first.network == validation[point.name]["first"] in tried
        network = next(n for n in m.networks if n.name == first.network)
        assert network.resolution == 16
        sub = load_bundle(smoke_run / "bundle" / network.path).manifest
        assert sub.fixed_architecture == first.architecture and sub.preprocessing.input_size == 16
        if not first.network.startswith("mobilenet_v2"):  # an architecture of the meta-graph, named by its code
            assert first.network == f"{first.architecture}@16" and sub.search_space.num_modules == space.num_modules
