"""prune_core.label_shift on synthetic data whose true posteriors are known (seeded, tolerance-based).

The data are drawn with torch's seeded generator; everything but fit_calibration takes and returns numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prune_core.label_shift import (
    IDENTITY,
    Calibration,
    CalibrationMethod,
    PriorTracker,
    bbse_prior,
    class_prior,
    confusion_matrix,
    correct,
    em_prior,
    fit_calibration,
    floored,
    predicted_distribution,
    softmax,
    total_variation,
)

K = 4
MEANS = torch.tensor([[0.0, 0.0], [1.6, 0.0], [0.0, 1.6], [1.6, 1.6]], dtype=torch.float64)
SOURCE = np.full(K, 1.0 / K)


def sample(prior: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from `prior` and the exact source-posterior logits of 2-D unit Gaussians around MEANS."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.as_tensor(prior, dtype=torch.float64), n, replacement=True, generator=gen)
    x = MEANS[labels] + torch.randn(n, 2, generator=gen, dtype=torch.float64)
    logits = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1) + torch.as_tensor(SOURCE).log()
    return logits.numpy(), labels.numpy()


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def drawn_labels(logits: np.ndarray, seed: int) -> np.ndarray:
    """One label per row drawn from softmax(logits): labels for which softmax(logits) is calibrated."""
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.from_numpy(softmax(logits)), 1, generator=gen).squeeze(1).numpy()


SHIFTED = np.array([0.6, 0.3, 0.1, 0.0])


def test_em_recovers_a_known_shifted_prior():
    logits, _ = sample(SHIFTED, 6000, seed=1)
    q = em_prior(softmax(logits), SOURCE, max_iter=500, tol=1e-8)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-9)
    assert q.dtype == np.float64 and np.allclose(q, SHIFTED, atol=0.04), q
    assert total_variation(q, SHIFTED) < 0.05 and total_variation(SOURCE, SHIFTED) == pytest.approx(0.4)
    # without a shift it stays at the source prior
    logits, _ = sample(SOURCE, 6000, seed=2)
    assert np.allclose(em_prior(softmax(logits), SOURCE), SOURCE, atol=0.04)


def test_correction_with_the_true_prior_raises_accuracy_on_shifted_data():
    logits, labels = sample(SHIFTED, 4000, seed=3)
    probs = softmax(logits)
    served = accuracy(probs, labels)
    corrected = accuracy(correct(probs, SOURCE, SHIFTED), labels)
    assert corrected > served + 0.05, (served, corrected)
    estimated = accuracy(correct(probs, SOURCE, em_prior(probs, SOURCE)), labels)
    assert estimated > served + 0.04, (served, estimated)


def test_the_floor_keeps_every_class_reachable():
    prior = np.array([1.0, 0.0, 0.0, 0.0])
    f = floored(prior, 0.01)
    assert float(f.min()) == pytest.approx(0.01, abs=1e-12)
    assert float(f.sum()) == pytest.approx(1.0, abs=1e-12)
    # an image the model is sure is class 3 stays class 3 although the estimate says class 3 never occurs
    probs = np.array([[0.0005, 0.0005, 0.0, 0.999], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    out = correct(probs, SOURCE, prior, floor=0.01)
    assert out.argmax(1).tolist() == [3, 0]
    assert out.dtype == np.float32 and np.allclose(out.sum(1), 1.0, atol=1e-6)  # in probs' dtype
    assert float(out[1, 1:].min()) > 0
    with pytest.raises(ValueError):
        floored(prior, 0.25)  # K * floor must stay below 1


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    logits, _ = sample(SOURCE, 5000, seed=4)
    labels = drawn_labels(logits, seed=5)
    cal = fit_calibration(logits * true_t, labels, CalibrationMethod.TEMPERATURE)
    assert cal.method is CalibrationMethod.TEMPERATURE and cal.bias is None
    assert cal.temperature == pytest.approx(true_t, rel=0.1)
    assert np.allclose(cal.apply(logits * true_t), softmax(logits), atol=0.05)


def test_bcts_recovers_temperature_and_bias():
    logits, _ = sample(SOURCE, 8000, seed=6)
    labels = drawn_labels(logits, seed=7)
    bias = np.array([0.8, -0.3, 0.0, -0.5])
    cal = fit_calibration(2.0 * (logits - bias), labels, CalibrationMethod.BCTS)
    assert cal.method is CalibrationMethod.BCTS
    assert cal.temperature == pytest.approx(2.0, rel=0.1)
    assert np.allclose(cal.bias, bias - bias.mean(), atol=0.15), cal.bias
    assert fit_calibration(logits, labels, CalibrationMethod.NONE) == IDENTITY


def test_calibration_round_trips_through_json_and_rejects_garbage():
    cal = Calibration(1.7, (0.1, -0.1, 0.0, 0.0))
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert Calibration.from_dict(Calibration(1.3).to_dict()) == Calibration(1.3)
    for bad in ([1.0], {"temperature": "2"}, {"temperature": 0.0}, {"temperature": 1.0, "bias": "x"},
                {"temperature": float("nan")}, {"temperature": 1.0, "bias": [True]}):
        with pytest.raises(ValueError):
            Calibration.from_dict(bad)
    with pytest.raises(ValueError):
        cal.apply(np.zeros((2, 3)))  # 4 biases, 3 classes


def test_bbse_recovers_the_prior():
    conditional = np.array(
        [[0.7, 0.1, 0.1, 0.0], [0.1, 0.8, 0.0, 0.1], [0.1, 0.0, 0.6, 0.2], [0.1, 0.1, 0.3, 0.7]]
    )
    mu = conditional @ SHIFTED
    assert np.allclose(bbse_prior(conditional * 250, mu), SHIFTED, atol=1e-9)  # counts or shares alike
    # estimated from samples: the source confusion on labelled data, predictions on unlabelled target data
    src_logits, src_labels = sample(SOURCE, 6000, seed=8)
    tgt_logits, _ = sample(SHIFTED, 6000, seed=9)
    confusion = confusion_matrix(src_logits.argmax(1), src_labels, K)
    q = bbse_prior(confusion, predicted_distribution(tgt_logits))
    assert np.allclose(q, SHIFTED, atol=0.05), q
    assert float(q.min()) >= 0 and float(q.sum()) == pytest.approx(1.0)


def test_bbse_survives_a_singular_confusion():
    conditional = np.array(
        [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )  # classes 0 and 1 are indistinguishable
    q = bbse_prior(conditional, np.array([0.3, 0.3, 0.4, 0.0]))
    assert np.isfinite(q).all() and float(q.min()) >= 0 and float(q.sum()) == pytest.approx(1.0)
    assert float(q[0] + q[1]) == pytest.approx(0.6, abs=1e-6) and float(q[2]) == pytest.approx(0.4, abs=1e-6)


def test_class_prior_counts_labelled_samples_only():
    assert class_prior(np.array([0, 0, 1, -1, 3]), 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    with pytest.raises(ValueError):
        class_prior(np.array([-1, -1]), 4)


def test_tracker_follows_the_window():
    tracker = PriorTracker(SOURCE, window=1000, min_samples=100)
    first, _ = sample(SHIFTED, 1000, seed=10)
    tracker.add(softmax(first[:99]))
    assert tracker.estimate() is None and len(tracker) == 99
    tracker.add(softmax(first[99]))  # one vector at a time works too
    assert tracker.estimate() is not None
    tracker.add(softmax(first[100:]))
    a = tracker.estimate()
    assert tracker.estimate() is a  # nothing new: not recomputed
    assert np.allclose(a, SHIFTED, atol=0.06), a
    # the traffic changes: class 3 appears, class 0 goes; once the window has turned over the estimate follows
    later = np.array([0.0, 0.2, 0.3, 0.5])
    second, _ = sample(later, 1000, seed=11)
    tracker.add(softmax(second))
    assert len(tracker) == 1000 and tracker.seen == 2000
    assert np.allclose(tracker.estimate(), later, atol=0.06), tracker.estimate()
    tracker.reset()
    assert len(tracker) == 0 and tracker.estimate() is None
    with pytest.raises(ValueError):
        tracker.add(np.ones(3) / 3)


def test_em_rejects_a_zero_source_prior():
    with pytest.raises(ValueError):
        em_prior(np.full((3, K), 0.25), np.array([0.5, 0.5, 0.0, 0.0]))
    assert math.isclose(float(em_prior(np.full((3, K), 0.25), SOURCE).sum()), 1.0)

