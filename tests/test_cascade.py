"""Resolution cascades: lower-resolution networks, threshold fitting, the `twins` phase."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.bundle import session_options
from training import cascade
from training.evaluate import fixed_policy
from training.bundle_writer import export_graph
from training.metagraph import MetaGraph
from training.resolution import AtResolution, check, downsample
from training.searchspace import build_tiny_space


def test_downsample_is_the_mean_of_each_square():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    low = downsample(x, 2)
    assert low.shape == (2, 3, 2, 2)
    assert low[1, 2, 1, 0].item() == pytest.approx(x[1, 2, 2:4, 0:2].mean().item())
    assert downsample(x, 4) is x


@pytest.mark.parametrize("resolution, message", [(24, "does not divide"), (64, "does not divide"), (0, "positive"),
                                                 (2, "total stride"), (16.0, "positive"), (True, "positive")])
def test_a_resolution_a_network_cannot_run_at_is_refused(resolution, message):
    with pytest.raises(ValueError, match=message):
        check(resolution, 32, 4)


def test_a_network_at_a_lower_resolution_exports_to_onnx_exactly(tmp_path):
    """The pooling is part of the graph: onnxruntime on the full-size input equals PyTorch to 1e-5."""
    space = build_tiny_space(10, 32)
    torch.manual_seed(0)
    model = MetaGraph(space).eval()
    path = np.ones((space.num_cells, space.num_modules), bool)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.low = AtResolution(model, 16)

        def forward(self, x):
            return self.low.forward_selected(x, fixed_policy(path)(x))

    export_graph(Net(), (3, 32, 32), tmp_path / "net.onnx")
    x = torch.randn(5, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), session_options(1), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.forward_selected(torch.nn.functional.avg_pool2d(x, 2), fixed_policy(path)(x)).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() < 1e-5


def test_the_frontier_of_a_hand_case():
    """Four images, the first stage right on the first and third; ties stop or escalate together."""
    confidence = np.array([0.9, 0.8, 0.8, 0.5])
    first = np.array([1, 0, 1, 0], bool)
    last = np.array([1, 1, 1, 1], bool)
    front = cascade.frontier(confidence, first, last)
    assert front.thresholds.tolist() == [0.5, 0.8, 0.9, np.inf]
    assert front.escalated.tolist() == [0.0, 0.25, 0.75, 1.0]
    assert front.top1.tolist() == [0.5, 0.75, 1.0, 1.0]
    # the cheapest cascade at 75% escalates one image, at 100% three
    assert cascade.fit(front, floor=0.75) == (0.8, 0.25, 0.75)
    assert cascade.fit(front, floor=1.0) == (0.9, 0.75, 1.0)
    # out of reach: the most accurate, escalating the fewest images among those
    assert cascade.fit(front, floor=1.01) == (0.9, 0.75, 1.0)
    assert cascade.apply(confidence, 0.8).tolist() == [False, False, False, True]
    assert cascade.apply(confidence, np.inf).all()


def test_a_threshold_holds_the_floor_at_every_costlier_one():
    """Top-1 by escalation: 25%, 50%, 25%, 50%, 75%. Escalating one image touches a 50% floor, the
    next loses it again (that image was right only at the first stage): the fit is the threshold
    from which 50% holds, three escalated images; a floor nowhere reached gives the most accurate."""
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    first = np.array([0, 0, 1, 0], bool)
    last = np.array([1, 1, 0, 1], bool)
    front = cascade.frontier(confidence, first, last)
    assert front.top1.tolist() == [0.25, 0.5, 0.25, 0.5, 0.75]
    assert cascade.fit(front, floor=0.5) == (0.9, 0.75, 0.5)
    assert cascade.fit(front, floor=0.25) == (0.6, 0.0, 0.25)
    assert cascade.fit(front, floor=0.8) == (np.inf, 1.0, 0.75)


def test_the_frontier_agrees_with_applying_each_threshold():
    rng = np.random.default_rng(0)
    confidence = np.round(rng.random(300), 2)  # many ties
    first, last = rng.random(300) < 0.7, rng.random(300) < 0.9
    front = cascade.frontier(confidence, first, last)
    for t, escalated, top1 in zip(front.thresholds, front.escalated, front.top1):
        up = cascade.apply(confidence, t)
        assert up.mean() == pytest.approx(escalated)
        assert np.where(up, last, first).mean() == pytest.approx(top1)
    assert len(front.thresholds) == len(np.unique(confidence)) + 1


def test_confidences():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    assert cascade.confidence("max_softmax", logits) == pytest.approx([0.7, 0.4])
    assert cascade.confidence("margin", logits) == pytest.approx([0.5, 0.0])
    shifted = np.array([[1000.0, 999.0, -50.0]])  # no overflow: softmax of (1, 0, -1050)
    e = np.exp(-1.0)
    assert cascade.confidence("max_softmax", shifted) == pytest.approx([1 / (1 + e)])
    assert cascade.confidence("margin", shifted) == pytest.approx([(1 - e) / (1 + e)])
    with pytest.raises(ValueError, match="one entry per image"):
        cascade.frontier(np.ones(3), np.ones(2, bool), np.ones(3, bool))


def test_cascade_answers_by_hand():
    """Two rows: the first stops at the twin (max softmax 0.7 >= 0.6), the second escalates and the
    last stage blends a quarter of the twin's answer into its own."""
    from service.manifest import Cascade, Stage
    from training.cascade_points import answers

    point = Cascade(name="c", stages=[Stage(network="low", architecture="x", threshold=0.6),
                                      Stage(network="high", architecture="y", blend=0.25)])
    low = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]))
    high = np.log(np.array([[0.1, 0.1, 0.8], [0.2, 0.6, 0.2]]))
    final, answered = answers(point, {("low", "x"): low, ("high", "y"): high})
    assert answered.tolist() == [0, 1]
    assert np.exp(final[0]) == pytest.approx([0.7, 0.2, 0.1])
    assert np.exp(final[1]) == pytest.approx([0.75 * 0.2 + 0.25 * 0.5, 0.75 * 0.6 + 0.25 * 0.3, 0.75 * 0.2 + 0.25 * 0.2])
    assert cascade.blend(high, low, 0.0) is high


def test_twins_fine_tunes_the_baseline_at_each_resolution(smoke_run):
    state = torch.load(smoke_run / "twins.pt", weights_only=False)
    # the smoke preset: one epoch, then one polishing epoch (no cutout, a fresh schedule)
    assert state["done"] and [set(c) >= {"val_top1_16"} for c in state["curve"]] == [True, True]
    base = torch.load(smoke_run / "baseline.pt", weights_only=False)["model"]
    moved = [k for k, v in base.items() if v.dtype.is_floating_point
             and not torch.equal(state["model"][f"twins.0.model.{k}"], v)]
    assert moved, "the twin starts from the baseline and trains"


def test_coadapt_fine_tunes_two_copies_of_the_baseline(smoke_run):
    state = torch.load(smoke_run / "coadapt.pt", weights_only=False)
    [figures] = state["curve"]  # the smoke preset: one epoch
    assert {"val_top1_coadapted", "val_routed_top1_coadapted", "val_top1_shuffled", "val_routed_top1_shuffled"} <= set(figures)
    base = torch.load(smoke_run / "baseline.pt", weights_only=False)["model"]
    for copy in (0, 1):
        assert any(not torch.equal(state["model"][f"copies.{copy}.{k}"], v)
                   for k, v in base.items() if v.dtype.is_floating_point), "each copy starts from the baseline and trains"
    assert any(not torch.equal(state["model"][f"copies.0.{k}"], state["model"][f"copies.1.{k}"])
               for k, v in base.items() if v.dtype.is_floating_point), "the copies train on different images"


def test_the_routed_images_are_the_least_sure_share():
    from training.coadapt import routed

    sure = np.array([0.9, 0.1, 0.5, 0.1, 0.7])
    assert routed(sure, 0.4).tolist() == [1, 3]  # ties in order
    assert routed(sure, 0.6).tolist() == [1, 3, 2]
    assert routed(sure, 0.01).tolist() == [1]  # at least one


def test_the_copies_split_a_call_between_them():
    from training.coadapt import Copies

    space = build_tiny_space(num_classes=3)
    copies = Copies(MetaGraph(space), MetaGraph(space)).eval()
    x = torch.randn(4, 3, 32, 32)
    path = fixed_policy(np.ones((space.num_cells, space.num_modules), bool))(x)
    with torch.no_grad():
        both = copies.forward_selected(x, path)
        assert torch.allclose(both[:2], copies.copies[0].forward_selected(x[:2], path[:2]))
        assert torch.allclose(both[2:], copies.copies[1].forward_selected(x[2:], path[2:]))


def test_a_three_stage_fit_is_the_most_accurate_within_the_budget_by_hand():
    from training.cascade import fit_three

    # four images; whether each stage's answer is right: the first gets image 0, the second 0-1, the third 0-2
    right = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    first, second = np.array([0.9, 0.2, 0.3, 0.1]), np.array([0.9, 0.8, 0.2, 0.1])
    # image 2 needs the third stage: escalating it escalates image 3 too (less sure at both stages)
    best = fit_three(first, second, right, (1, 4, 8), budget=100)
    assert best.top1 == 0.75 and best.escalated == (0.75, 0.5) and best.mflops == 8.0
    assert 0.3 < best.thresholds[0] <= 0.9 and 0.2 < best.thresholds[1] <= 0.8
    # a budget below that: image 1 alone is worth paying for (image 3 comes along, escalating at 0.1)
    tight = fit_three(first, second, right, (1, 4, 8), budget=7.9)
    assert (tight.top1, tight.escalated, tight.mflops) == (0.5, (0.5, 0.0), 3.0)
    assert fit_three(first, second, right, (1, 4, 8), budget=0.5) is None  # not even the first stage fits
    with pytest.raises(ValueError, match="every image"):
        fit_three(first, second[:3], right, (1, 4, 8), budget=10)


def test_the_export_adds_the_networks_and_cascades_fitted_on_validation(smoke_run):
    from service.bundle import load_bundle

    m = load_bundle(smoke_run / "bundle").manifest
    # the cascades' networks and no other: the twin or an architecture of the meta-graph at 16x16 first
    # (tests/test_multires.py), a full-resolution network last
    used = {stage.network for c in m.cascades for stage in c.stages} - {None}  # None: the bundle's own graphs
    assert sorted(n.name for n in m.networks) == sorted(used) and "mobilenet_v2@16" in used
    low = {n.name for n in m.networks if n.resolution == 16}
    assert used - low <= {"mobilenet_v2", "mobilenet_v2-coadapted"} and all(name.endswith("@16") for name in low)
    assert [c.name for c in m.cascades] == ["cascade-0", "cascade-0.3", "cascade-1", "cascade-2", "cascade-top"]
    validation = m.training["validation"]
    *pairs, top = m.cascades
    # the most accurate point: twin, full-resolution network, then one of the meta-graph's frequent architectures
    first, second, third = top.stages
    figures = validation["cascade-top"]
    assert first.network == "mobilenet_v2@16" and second.network == figures["network"]
    assert third.network is None and third.architecture == figures["architecture"]
    assert third.architecture in [f.code for f in m.frequent_architectures][:4] and third.blend in (0.3, 0.5)
    assert [first.threshold, second.threshold] == pytest.approx(figures["threshold"], abs=1e-6)
    assert figures["escalated_to_last"] <= figures["escalated"] == pytest.approx(top.validation.escalated, abs=1e-4)
    assert top.evaluation.images == 200 and top.evaluation.mean_measured_latency_ms > 0
    for point in pairs:
        first, last = point.stages
        assert first.network == validation[point.name]["first"] in low and last.threshold is None
        assert last.network == validation[point.name]["network"] in ("mobilenet_v2", "mobilenet_v2-coadapted")
        assert first.threshold == pytest.approx(validation[point.name]["threshold"], abs=1e-6)
        e = point.evaluation
        assert e.images == 200 and 0 <= e.escalated <= 1 and e.mean_measured_latency_ms > 0
    assert m.default_controller in validation
    report = json.loads((smoke_run / "report" / "report.json").read_text())
    assert report["points"]["cascade-top"]["oracle"] is None and "cascade-top" not in report["coadaptation"]
    assert report["controls"]["cascade-top"]["static_twin"]["stage"] in (0, 1, 2)
    for point in pairs:
        entry, control = report["points"][point.name], report["controls"][point.name]
        assert entry["escalated"] == pytest.approx(point.evaluation.escalated, abs=1e-9)
        assert entry["top1"] == pytest.approx(point.evaluation.top1, abs=1e-4)
        assert control["shuffled"]["escalated"] == pytest.approx(entry["escalated"])
        assert control["static_twin"]["code"] in (f"{first.network}/{first.architecture}",
                                                  f"{point.stages[-1].network}/1111")
        assert entry["latency"]["per_block"]["mean_ms"] > 0 and entry["latency"]["fused"]["mean_ms"] > 0
        # the oracle is as accurate as the point, escalating only images it fixes
        assert entry["oracle"]["top1"] == pytest.approx(entry["top1"]) and entry["oracle"]["escalated"] <= entry["escalated"]
        # co-adaptation at the point's own threshold: its shipped last stage gives the point's answers
        c = report["coadaptation"][point.name]
        assert c["escalated"] == pytest.approx(entry["escalated"]) and c["network"] == point.stages[-1].network
        shipped = "baseline" if c["network"] == "mobilenet_v2" else "coadapted"
        assert c["top1"][shipped] == pytest.approx(entry["top1"], abs=0.011)
        assert set(c["top1"]) == {"baseline", "coadapted", "shuffled"}
        assert c["coadapted_minus_shuffled"]["low"] <= c["coadapted_minus_shuffled"]["high"]
    frontier = (smoke_run / "report" / "FRONTIER.md").read_text()
    assert "Co-adaptation" in frontier and "oracle" in frontier


def test_a_cascade_oracle_escalates_only_what_it_must_fix():
    from training.report import cascade_oracle, oracle_share

    correct = np.array([[1, 1, 0, 0, 0, 1, 0, 1, 1, 1],
                        [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]], bool)  # first stage 6/10; 2 images only the last gets
    o = cascade_oracle(correct, 0.8)
    assert (o["escalated"], o["top1"]) == (0.2, 0.8)
    assert cascade_oracle(correct, 0.9)["escalated"] == 0.2  # all it can fix
    assert cascade_oracle(correct, 0.5)["escalated"] == 0
    assert cascade_oracle(np.ones((3, 4), bool), 1.0) is None
    priced = oracle_share(o, [0.1, 0.3], point_ms=0.2, baseline_ms=0.3)
    assert priced["fused_ms"] == pytest.approx(0.16) and priced["gap_recovered"] == pytest.approx(0.1 / 0.14)
    assert oracle_share(o, [0.1, 0.3], 0.2, baseline_ms=0.15)["gap_recovered"] is None


def test_a_cascades_static_twin_is_the_best_stage_it_can_afford_as_measured():
    from types import SimpleNamespace

    from training.config import ReportConfig
    from training.report import cascade_static_twin

    ctx = SimpleNamespace(config=SimpleNamespace(report=ReportConfig(resamples=50), seed=0))
    stages = [SimpleNamespace(network="net@16", code="11", resolution=16, estimated_ms=0.5),
              SimpleNamespace(network="net", code="11", resolution=32, estimated_ms=0.8)]
    runner = SimpleNamespace(stages=stages)
    correct = np.array([1, 1, 1, 0], bool)
    per_image = {"correct": correct, "stage_val_top1": [0.79, 0.85],
                 "stage_correct": np.array([[1, 0, 0, 0], [1, 1, 1, 1]], bool)}
    timed = [{"mean_ms": 0.14}, {"mean_ms": 0.40}]
    # the point costs 0.30 ms as measured: the last stage alone (0.40) is not a twin at its cost,
    # even though the per-block estimates (0.5 + escalations x 0.8) would price the point above it
    twin = cascade_static_twin(ctx, runner, per_image, timed, point_ms=0.30)
    assert (twin["code"], twin["stage"], twin["resolution"], twin["top1"]) == ("net@16/11", 0, 16, 0.25)
    assert twin["point_minus_control"]["difference"] == pytest.approx(0.5)
    # where the point costs as much as the last stage, the more accurate one (on validation) is the twin
    assert cascade_static_twin(ctx, runner, per_image, timed, point_ms=0.40)["stage"] == 1
    # cheaper than every stage: the cheapest stage stands in
    assert cascade_static_twin(ctx, runner, per_image, timed, point_ms=0.10)["stage"] == 0


def test_the_default_point_is_the_fastest_within_the_tolerance():
    from training.export import default_point

    val = {"A": {"top1": 0.860, "latency_ms": 3.0}, "B": {"top1": 0.858, "latency_ms": 2.0},
           "C": {"top1": 0.850, "latency_ms": 1.0}}
    assert default_point(val, 0.860, tolerance=0.3) == "B"
    assert default_point(val, 0.860, tolerance=0.0) == "A"
    assert default_point(val, 0.860, tolerance=1.0) == "C"
    assert default_point(val, 0.900, tolerance=0.3) == "A"  # none within: the most accurate
