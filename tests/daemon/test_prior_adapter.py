"""daemon.serving.prior_adapter: the device's class prior, corrected answers, counterfactual spot checks, carry-over."""
from __future__ import annotations

import numpy as np
import torch

from daemon.serving.prior_adapter import ModelPrior, PriorAdapter, PriorSettings
from prune_core.label_shift import softmax, total_variation
from prune_core.model_format import ModelCard


def _traffic(n: int, seed: int = 0, classes=(0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Exact log-likelihoods (float32 N×3, as an engine answers) of three overlapping 2-D Gaussians
    (calibrated posteriors under a uniform prior) on traffic of `classes` only. Drawn with torch's seeded generator."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.75, 1.0]])
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    x = means[labels] + torch.randn(n, 2, generator=g)
    logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return logits.numpy(), labels.numpy()


CARD = ModelCard("cifar_small", 3, ["a", "b", "c"], 32)
MODEL = ModelPrior.of("v0001", CARD)


def _stream(adapter: PriorAdapter, logits: np.ndarray, model: ModelPrior = MODEL, step: int = 10):
    """Answer in batches of `step`, refreshing after each as the scheduler polls; the answers."""
    out = []
    for i in range(0, len(logits), step):
        out.append(adapter.answer(model, logits[i:i + step]))
        adapter.refresh(model)
    return out


def test_prior_estimate_converges_and_correction_helps():
    adapter = PriorAdapter(PriorSettings())
    logits, labels = _traffic(1000)
    answers = _stream(adapter, logits)
    served = np.concatenate([a.served for a in answers[10:]])
    raw = np.concatenate([a.raw for a in answers[10:]])
    assert served.dtype == raw.dtype == np.float32
    late = labels[100:]
    assert (served.argmax(1) == late).mean() > (raw.argmax(1) == late).mean() + 0.05
    view = adapter.view(MODEL)
    assert view.applied and view.samples == 1000 and view.expected_gain > 0.01 and view.reason.startswith("correcting")
    assert view.estimate[2] < 0.05 and abs(view.estimate[0] - 0.5) < 0.1
    assert abs(sum(served[0].tolist()) - 1) < 1e-5 and float(served.min()) > 0  # the floor: no class at zero


def test_a_pending_estimate_counts_only_the_answers_taken_in():
    adapter = PriorAdapter(PriorSettings(min_samples=24))
    adapter.answer(MODEL, _traffic(116)[0])  # recorded, not yet refreshed
    assert adapter.view(MODEL).reason == "estimating: 0 of 24 samples"
    adapter.refresh(MODEL)
    view = adapter.view(MODEL)
    assert view.samples == 116 and view.estimate is not None


def test_spot_checks_see_the_correction_they_switched_off_and_turn_it_back_on():
    """Labels say the corrected answers are worse: correction goes off; the spot checks keep comparing the
    corrected answer (under the estimate in force) with the raw one, so when the labels say it pays, it is on again."""
    adapter = PriorAdapter(PriorSettings(spot_window=40))
    _stream(adapter, _traffic(200)[0])
    assert adapter.view(MODEL).applied
    for _ in range(20):  # the corrected answer wrong where the raw one was right
        adapter.spot_check(raw_pred=2, corrected_pred=1, label=2)
    adapter.refresh(MODEL)
    view = adapter.view(MODEL)
    assert not view.applied and view.reason.startswith("labelled requests: the uncorrected")
    a = adapter.answer(MODEL, _traffic(4, seed=1)[0])
    assert np.array_equal(a.served, a.raw) and a.corrected_pred is not None  # served raw, the corrected answer still known
    for _ in range(40):  # the window moves on: corrected right, raw wrong
        adapter.spot_check(raw_pred=2, corrected_pred=int(a.corrected_pred[0]), label=int(a.corrected_pred[0]))
    adapter.refresh(MODEL)
    assert adapter.view(MODEL).applied and adapter.view(MODEL).spot_check.labelled == 40


def test_disabled_adapter_still_estimates_but_serves_uncorrected():
    card = ModelCard("cifar_small", 3, ["a", "b", "c"], 32, class_prior=[0.4, 0.4, 0.2], temperature=2.0)
    model = ModelPrior.of("v0001", card)
    adapter = PriorAdapter(PriorSettings(enabled=False))
    logits, _ = _traffic(50)
    a = _stream(adapter, logits, model, step=50)[0]
    assert np.array_equal(a.served, a.raw)
    assert np.allclose(a.raw, softmax(logits / 2.0), atol=1e-6)  # the card's temperature
    view = adapter.view(model)
    assert not view.applied and view.reason == "prior_adaptation is off" and view.estimate is not None
    assert view.to_dict()["source_prior"] == {"a": 0.4, "b": 0.4, "c": 0.2} and adapter.target() is None


def test_no_shift_no_correction():
    """Traffic with the model's own prior: the estimate stays near it, under the gate, and the answers are the
    uncorrected ones; a cycle's teacher gets no target prior either."""
    adapter = PriorAdapter()
    _stream(adapter, _traffic(600, classes=(0, 1, 2))[0], step=50)
    a = adapter.answer(MODEL, _traffic(50, seed=3)[0])
    view = adapter.view(MODEL)
    assert view.estimate is not None and not view.applied and view.reason.startswith("no shift")
    assert np.array_equal(a.served, a.raw) and adapter.target() is None
    shifted = PriorAdapter()
    _stream(shifted, _traffic(600)[0], step=50)
    assert shifted.target() is not None and shifted.target()[2] < 0.05


def test_the_estimate_carries_over_to_a_new_model_through_its_own_calibration_and_prior():
    """A specialist trained for the traffic's prior (its card says so) needs no correction on that traffic; the
    generalist served again on it does, at once, with the estimate the specialist's answers built."""
    adapter = PriorAdapter()
    logits, labels = _traffic(400)
    _stream(adapter, logits[:200])
    q = adapter.target()
    specialist = ModelPrior.of("v0002", ModelCard("cifar_small", 3, ["a", "b", "c"], 32, class_prior=q, temperature=1.0))
    # the specialist's logits: the generalist's shifted to q (what a student of the corrected teacher learns)
    special = logits[200:300] + np.log(np.asarray(q, dtype=np.float32) * 3)
    _stream(adapter, special, specialist)
    view = adapter.view(specialist)
    assert not view.applied and view.reason.startswith("no shift") and total_variation(view.estimate, q) < 0.1  # kept
    back = adapter.answer(MODEL, logits[300:])  # the generalist again: corrected at once, by the carried estimate
    assert adapter.view(MODEL).applied
    assert (back.served.argmax(1) == labels[300:]).mean() > (back.raw.argmax(1) == labels[300:]).mean()


def test_replay_rebuilds_the_state_from_stored_answers():
    adapter = PriorAdapter()
    answers = _stream(adapter, _traffic(300)[0])
    rows = np.concatenate([a.rows for a in answers])
    preds = np.concatenate([a.raw.argmax(1) for a in answers])
    again = PriorAdapter()
    again.replay(MODEL, rows, preds, [None] * len(rows))
    before, after = adapter.view(MODEL), again.view(MODEL)
    assert after.applied and after.samples == before.samples
    assert np.allclose(after.estimate, before.estimate, atol=1e-3)


def test_a_generalist_fallback_starts_a_new_scene():
    adapter = PriorAdapter()
    _stream(adapter, _traffic(200)[0])
    assert adapter.view(MODEL).applied
    adapter.new_scene()
    view = adapter.view(MODEL)
    assert not view.applied and view.estimate is None and view.changes == 1 and view.last_change["scale"] == 0
    _stream(adapter, _traffic(100, seed=2, classes=(2,))[0])
    assert adapter.view(MODEL).applied and adapter.view(MODEL).estimate[2] > 0.8
