"""The learned escalation gate (training/gate.py): its labels, its cross-fitting, its comparison."""

from __future__ import annotations

import numpy as np
import pytest

from training import gate


def test_labels_say_where_escalating_pays_and_leave_out_images_no_stage_gets():
    first = np.array([1, 1, 0, 0], bool)
    last = np.array([1, 0, 1, 0], bool)
    y, used = gate.labels(first, last)
    assert y.tolist() == [0, 0, 1, 0]  # pays only where the first is wrong and the last right
    assert used.tolist() == [True, True, True, False]  # both wrong: left out


def test_features_are_sorted_probabilities_entropy_margin_and_the_named_class():
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    f = gate.features(logits)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert f.shape == (2, 2 * 3 + 2)
    assert f[0, :3] == pytest.approx(np.sort(p[0])[::-1])
    assert f[0, 3] == pytest.approx(-(p[0] * np.log(p[0])).sum())
    assert f[0, 4] == pytest.approx(np.sort(p[0])[-1] - np.sort(p[0])[-2])
    assert f[:, 5:].tolist() == [[0, 1, 0], [1, 0, 0]]


def test_the_fit_ranks_a_separable_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 1] * 3 + rng.normal(scale=0.5, size=400) > 1.0).astype(float)  # a minority of positives
    w = gate.fit(x, y)
    s = gate.score(w, x)
    assert s[y == 1].mean() > 0.7 > 0.3 > s[y == 0].mean()
    assert abs(w[1]) > 5 * max(abs(w[0]), abs(w[2]))
    with pytest.raises(ValueError, match="both labels"):
        gate.fit(x, np.zeros(400))


def test_no_image_is_scored_by_a_gate_that_saw_its_own_label():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 10)) * 2
    first = rng.random(300) < 0.7
    last = first | (rng.random(300) < 0.5)
    x = gate.features(logits)
    scores = gate.cross_fitted(x, first, last, folds=5, seed=3)
    fold = np.random.default_rng(3).permutation(300) % 5
    for i in (0, 17, 250):
        flipped_first, flipped_last = first.copy(), last.copy()
        flipped_first[i], flipped_last[i] = not first[i], True  # its label changes
        again = gate.cross_fitted(x, flipped_first, flipped_last, folds=5, seed=3)
        assert again[i] == scores[i]  # its own score does not move
        assert np.array_equal(again[fold == fold[i]], scores[fold == fold[i]])  # nor its fold's
        assert not np.array_equal(again[fold != fold[i]], scores[fold != fold[i]])  # the others' gates learned it


def test_the_comparison_fits_every_confidence_on_the_same_floor():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(500, 10)) * 3
    truth = rng.integers(0, 10, 500)
    first = logits.argmax(1) == truth
    last = first | (rng.random(500) < 0.6)
    floor = (first | last).mean() - 0.02
    out = gate.compare(logits, first, last, floor, first_ms=0.1, last_ms=0.3, folds=4)
    assert set(out) == {"max_softmax", "margin", "gate"}
    for figures in out.values():
        assert figures["top1"] >= floor - 1e-12
        assert figures["latency_ms"] == pytest.approx(0.1 + figures["escalated"] * 0.3)


def test_a_gate_confidence_without_its_weights_is_refused():
    from service.cascade import confidence

    with pytest.raises(ValueError, match="needs the gate's weights"):
        confidence("gate", np.zeros((2, 10)))


def test_the_reports_difficulty_plot_ranks_a_gate_stages_images_by_its_gate(tmp_path):
    from types import SimpleNamespace

    from service.cascade import confidence
    from training.report import _cascade_difficulty

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(20, 10)) * 2
    weights = tuple(rng.normal(size=23))  # 2 x 10 classes + 3
    stages = [SimpleNamespace(confidence="gate", gate=weights, resolution=16),
              SimpleNamespace(confidence="max_softmax", gate=None, resolution=32)]
    test = SimpleNamespace(images=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
                           classes=[str(c) for c in range(10)], labels=rng.integers(0, 10, 20))
    sure = confidence("gate", logits, weights)
    images = {"first": logits, "answered": (sure < 0.5).astype(int), "correct": rng.random(20) < 0.5}
    _cascade_difficulty(SimpleNamespace(test=test), SimpleNamespace(name="c", stages=stages), images, tmp_path, count=4)
    assert (tmp_path / "difficulty.png").read_bytes()[:4] == b"\x89PNG"
