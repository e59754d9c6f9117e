"""prune_core.online_prior on seeded synthetic streams whose true posteriors are known (margins, not exact floats)."""
from __future__ import annotations

import numpy as np
import pytest

from prune_core.label_shift import PriorTracker, correct, softmax, total_variation
from prune_core.online_prior import (
    FlhFtl, FollowTheHistory, OnlineCorrector, SafetySettings, SceneTracker, ShareDetector, chi2_quantile, decide, expected_gain,
    likelihood_rows, posterior, spot_verdict,
)

K = 4
MEANS = np.array([[0.0, 0.0], [1.6, 0.0], [0.0, 1.6], [1.6, 1.6]])
SOURCE = np.full(K, 1.0 / K)
A = np.array([0.5, 0.5, 0.0, 0.0])  # scene A: classes 0 and 1
B = np.array([0.0, 0.0, 0.5, 0.5])  # scene B: classes 2 and 3


def stream(priors: list[tuple[np.ndarray, int]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities under the uniform source prior (exact posteriors of 2-D unit Gaussians around
    MEANS) and labels, scene after scene: (prior, images)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.choice(K, size=n, p=p) for p, n in priors])
    x = MEANS[labels] + rng.standard_normal((len(labels), 2))
    return softmax(-0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)), labels


def test_likelihood_rows_carry_a_model_prior_over_to_another():
    probs, _ = stream([(A, 50)], seed=0)
    specialist = np.array([0.7, 0.1, 0.1, 0.1])
    theirs = correct(probs, SOURCE, specialist, floor=0.0)  # what a model trained under `specialist` would answer
    rows = likelihood_rows(theirs, specialist)
    assert np.allclose(rows, likelihood_rows(probs, SOURCE), atol=1e-9)
    assert np.allclose(posterior(rows, SOURCE), probs, atol=1e-9)


def test_chi2_quantile_is_close_to_the_table():
    assert chi2_quantile(9, 2.326) == pytest.approx(21.67, rel=0.02)  # 99 %
    assert chi2_quantile(3, 3.09) == pytest.approx(16.27, rel=0.05)  # 99.9 %


def test_detector_is_quiet_on_steady_traffic_and_finds_an_abrupt_change_within_tens_of_images():
    rng = np.random.default_rng(1)
    steady = ShareDetector(K)
    for lo in range(0, 4000, 16):
        steady.add(rng.choice(K, size=16, p=[0.4, 0.3, 0.2, 0.1]))
        assert steady.test() is None
    detector = ShareDetector(K)
    preds = np.concatenate([rng.choice(K, size=600, p=[0.45, 0.45, 0.05, 0.05]), rng.choice(K, size=200, p=[0.05, 0.05, 0.45, 0.45])])
    found = None
    for lo in range(0, len(preds), 8):
        detector.add(preds[lo:lo + 8])
        found = found or detector.test()
        if found:
            break
    assert found is not None and 600 < lo + 8 <= 600 + 40, lo
    assert abs(found.at - 600) <= 16 and len(detector) == found.scale


def test_scene_tracker_follows_an_abrupt_change_where_a_long_window_does_not():
    probs, _ = stream([(A, 800), (B, 48)], seed=2)
    rows = likelihood_rows(probs, SOURCE)
    scene, window = SceneTracker(K), PriorTracker(SOURCE, window=1024, min_samples=64)
    for lo in range(0, len(rows), 8):
        scene.add(rows[lo:lo + 8], probs[lo:lo + 8].argmax(1))
        scene.refresh()
        window.add(probs[lo:lo + 8])
    assert scene.changes == 1 and scene.estimate()[2:].sum() > 0.8, scene.estimate()
    assert window.estimate()[2:].sum() < 0.15


def test_published_estimators_converge_and_flh_ftl_adapts_where_fth_averages():
    probs, labels = stream([(A, 1500), (B, 600)], seed=3)
    confusion = np.zeros((K, K))
    held, held_y = stream([(SOURCE, 4000)], seed=4)
    np.add.at(confusion, (held.argmax(1), held_y), 1)
    fth, flh = FollowTheHistory(SOURCE, confusion), FlhFtl(SOURCE, confusion)
    for lo in range(0, len(probs), 10):
        for est in (fth, flh):
            est.update(probs[lo:lo + 10].argmax(1))
        if lo + 10 == 1500:
            assert total_variation(fth.estimate(), A) < 0.2 and total_variation(flh.estimate(), A) < 0.2  # clipped per-round BBSE: biased
    assert total_variation(flh.estimate(), B) < 0.3 < 0.5 < total_variation(fth.estimate(), B)


def test_the_safety_rule():
    s = SafetySettings(gate=0.2, min_gain=0.01)
    assert decide(s, shift=0.5, gain=0.05, evidence=0.3, spots=(0, 0)).applied
    assert not decide(s, shift=0.1, gain=0.05, evidence=0.3, spots=(0, 0)).applied
    assert not decide(s, shift=0.5, gain=0.005, evidence=0.3, spots=(0, 0)).applied
    assert decide(s, shift=0.5, gain=0.05, evidence=-1.0, spots=(0, 0)).applied  # not yet 20 times likelier without
    assert "worse" in decide(s, shift=0.5, gain=0.05, evidence=-4.0, spots=(0, 0)).reason
    assert decide(s, shift=0.5, gain=0.05, evidence=None, spots=(0, 0)).applied  # nothing arrived after the estimate yet
    off = decide(s, shift=0.5, gain=0.05, evidence=0.3, spots=(12, 2))  # labels overrule: the corrected did worse
    assert not off.applied and off.reason.startswith("labelled")
    assert decide(s, shift=0.1, gain=0.0, evidence=-1.0, spots=(1, 12)).applied  # and better
    assert spot_verdict(3, 5, 2.0) == 0  # a few disagreements decide nothing either way


def test_corrector_never_serves_a_stale_scene_for_long_and_its_spot_checks_see_both_answers():
    probs, labels = stream([(A, 600), (B, 600)], seed=5)
    rows, raw = likelihood_rows(probs, SOURCE), probs.argmax(1)
    corrector = OnlineCorrector(K, min_samples=24)
    served = np.empty(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), 8):
        post = corrector.correct(rows[lo:lo + 8])
        on = corrector.state.applied and post is not None
        served[lo:lo + 8] = post.argmax(1) if on else raw[lo:lo + 8]
        for i in range(lo, lo + 8, 4):  # one in four labelled
            corrector.spot_check(int(raw[i]), None if post is None else int(post[i - lo].argmax()), int(labels[i]))
        corrector.record(rows[lo:lo + 8], raw[lo:lo + 8], SOURCE)
        corrector.refresh(SOURCE)
    hit, base = served == labels, raw == labels
    assert corrector.state.changes >= 1 and corrector.state.applied
    assert hit[600:700].mean() >= base[600:700].mean() - 0.1  # the first 100 after the change: not the stale scene's answers
    assert hit[700:].mean() > base[700:].mean() + 0.05 and hit[100:600].mean() > base[100:600].mean() + 0.05
    labelled, correct_raw, correct_corrected = corrector.spot_totals()
    assert labelled > 20 and correct_corrected > correct_raw  # counterfactual: counted whichever was served


def test_corrector_keeps_correction_off_on_traffic_with_the_models_own_prior():
    probs, _ = stream([(SOURCE, 800)], seed=6)
    corrector = OnlineCorrector(K)
    for lo in range(0, len(probs), 16):
        corrector.record(likelihood_rows(probs[lo:lo + 16], SOURCE), probs[lo:lo + 16].argmax(1), SOURCE)
        corrector.refresh(SOURCE)
    assert corrector.state.estimate is not None and not corrector.state.applied
    assert expected_gain(likelihood_rows(probs, SOURCE), probs.argmax(1), SOURCE) == pytest.approx(0.0, abs=1e-12)


def test_an_idle_refresh_changes_nothing_but_a_spot_check_is_decided_on():
    probs, labels = stream([(A, 200)], seed=7)
    corrector = OnlineCorrector(K)
    corrector.record(likelihood_rows(probs, SOURCE), probs.argmax(1), SOURCE)
    state = corrector.refresh(SOURCE)
    assert state.applied and corrector.refresh(SOURCE) is state  # nothing new: the same decision, no EM
    for _ in range(12):
        corrector.spot_check(raw_pred=2, corrected_pred=0, label=2)
    assert not corrector.refresh(SOURCE).applied
