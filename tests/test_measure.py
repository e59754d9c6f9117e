"""prune_core.measure.compare: agreement with a reference and the loss its probabilities expect."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prune_core.measure import agreement, compare


class _Table(nn.Module):
    """Answers fixed logits for the sample indices it is given (x[:, 0])."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.register_buffer("table", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_compare_estimates_the_loss_by_the_references_probabilities():
    """Sample 0: the reference says (0.7, 0.3), the model answers 1 (a loss of 0.4 as the reference
    sees it); sample 1: both answer 1 (no loss). Agreement 1/2, expected loss 0.2, its standard error
    std(0.4, 0) / sqrt(2) = 0.2."""
    reference = _Table([[math.log(0.7), math.log(0.3)], [math.log(0.2), math.log(0.8)]])
    model = _Table([[0.0, 1.0], [0.0, 1.0]])
    got = compare(model, reference, [(torch.tensor([[0.0], [1.0]]), torch.tensor([-1, -1]))])
    assert got.samples == 2 and got.agreement == 0.5
    assert got.expected_loss == pytest.approx(0.2) and got.expected_loss_se == pytest.approx(0.2)
    assert agreement(model, reference, [(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1]))]) == 0.5
    empty = compare(model, reference, [])
    assert empty.samples == 0 and math.isnan(empty.expected_loss)
