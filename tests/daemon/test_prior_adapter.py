"""daemon.prior_adapter: serving under the estimated class prior, with the labelled spot check."""
from __future__ import annotations

import numpy as np
import torch

from daemon.prior_adapter import PriorAdapter, PriorSettings
from prune_core.label_shift import softmax
from prune_core.model_format import ModelCard


def _traffic(n: int, seed: int = 0, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Exact log-likelihoods (float32 N×3, as an engine answers) of three overlapping 2-D Gaussians
    (calibrated posteriors under a uniform prior) on traffic of classes 0 and 1 only: knowing the
    prior is worth a lot. Drawn with torch's seeded generator."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.75, 1.0]])
    labels = torch.randint(0, classes, (n,), generator=g)
    x = means[labels] + torch.randn(n, 2, generator=g)
    logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return logits.numpy(), labels.numpy()


def test_prior_estimate_converges_and_correction_helps():
    card = ModelCard("cifar_small", 3, ["a", "b", "c"], 32)
    adapter = PriorAdapter(card, PriorSettings(min_samples=50))
    logits, labels = _traffic(2000)
    served, raw = [], []
    for i in range(0, 2000, 10):
        s, r = adapter.answer(logits[i:i + 10])
        adapter.refresh()  # the scheduler's poll
        served.append(s)
        raw.append(r)
    served, raw = np.concatenate(served[50:]), np.concatenate(raw[50:])  # after the estimate settled
    assert served.dtype == raw.dtype == np.float32
    late = labels[500:]
    assert (served.argmax(1) == late).mean() > (raw.argmax(1) == late).mean() + 0.05
    view = adapter.view()
    assert view.applied and view.samples == 1024  # the window
    assert view.estimate[2] < 0.05 and abs(view.estimate[0] - 0.5) < 0.1
    assert abs(sum(served[0].tolist()) - 1) < 1e-5 and float(served.min()) > 0  # the floor: no class at zero


def test_spot_check_switches_correction_off_when_it_hurts_and_back_on():
    card = ModelCard("cifar_small", 3, ["a", "b", "c"], 32)
    adapter = PriorAdapter(card, PriorSettings(min_samples=10, spot_min=5, spot_window=10))
    logits, _ = _traffic(100)
    adapter.answer(logits)
    adapter.refresh()
    assert adapter.view().applied
    for _ in range(5):  # the corrected answer was wrong where the raw one was right
        adapter.spot_check(raw_pred=2, served_pred=1, label=2)
    view = adapter.view()
    assert not view.applied and "labelled" in view.reason
    served, raw = adapter.answer(logits[:4])
    assert np.array_equal(served, raw)
    for _ in range(10):  # the window moves on: corrected right, raw wrong
        adapter.spot_check(raw_pred=2, served_pred=1, label=1)
    assert adapter.view().applied and adapter.view().spot_check.labelled == 10


def test_disabled_adapter_still_estimates_but_serves_uncorrected():
    card = ModelCard("cifar_small", 3, ["a", "b", "c"], 32, class_prior=[0.4, 0.4, 0.2], temperature=2.0)
    adapter = PriorAdapter(card, PriorSettings(enabled=False, min_samples=10))
    logits, _ = _traffic(50)
    served, raw = adapter.answer(logits)
    adapter.refresh()
    assert np.array_equal(served, raw)
    assert np.allclose(raw, softmax(logits / 2.0), atol=1e-6)  # the card's temperature
    view = adapter.view()
    assert not view.applied and view.reason == "prior_adaptation is off" and view.estimate is not None
    assert view.to_dict()["source_prior"] == {"a": 0.4, "b": 0.4, "c": 0.2}


def test_no_shift_no_correction():
    """Traffic with the model's own prior: EM's estimate stays near it, under the gate, and the answers
    are the uncorrected ones; a cycle's teacher gets no target prior either."""
    card = ModelCard("cifar_small", 3, ["a", "b", "c"], 32)
    adapter = PriorAdapter(card, PriorSettings(min_samples=50, gate=0.2))
    logits, _ = _traffic(600, classes=3)
    adapter.answer(logits)
    adapter.refresh()
    served, raw = adapter.answer(logits[:50])
    view = adapter.view()
    assert view.estimate is not None and not view.applied and view.reason.startswith("no shift")
    assert np.array_equal(served, raw) and adapter.target() is None
    shifted = PriorAdapter(card, PriorSettings(min_samples=50, gate=0.2))
    shifted.answer(_traffic(600)[0])
    shifted.refresh()
    assert shifted.target() is not None and shifted.target()[2] < 0.05
