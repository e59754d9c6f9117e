"""daemon.drift: the generalist notices a class the specialist was not trained for."""
from __future__ import annotations

import torch

from daemon.drift import DriftSettings, DriftWatch
from prune_core.model_format import ModelCard

NAMES = ["a", "b", "c", "d"]


def _logits(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A fairly good generalist: the true class gets a clear margin over noise."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), 4, generator=g)
    logits[torch.arange(len(labels)), labels] += 3.0
    return logits


def test_a_class_the_specialist_never_saw_is_reported_once_frequent():
    generalist = ModelCard("cifar_small", 4, NAMES, 32)
    specialist = ModelCard("cifar_small", 4, NAMES, 32, class_prior=[0.33, 0.33, 0.33, 0.01])
    watch = DriftWatch(generalist, DriftSettings(window=100, min_samples=40, appear_share=0.1, trained_share=0.02))
    assert watch.appeared(specialist) is None  # no samples yet
    watch.observe(_logits(torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(1)), 0))
    assert watch.appeared(specialist) is None  # a, b, c only: what it was specialised for
    watch.observe(_logits(torch.full((30,), 3), 1))  # d arrives: 30 of the last 100
    found = watch.appeared(specialist)
    assert found is not None and found.classes == ["d"] and 0.2 < found.shares[0] < 0.4
    assert "d at" in found.describe()
    # the generalist itself (uniform prior) or a model of other classes never triggers
    assert watch.appeared(generalist) is None
    assert watch.appeared(ModelCard("cifar_small", 4, list("wxyz"), 32, class_prior=[0.3, 0.3, 0.4, 0.0])) is None
