"""prune_core.judging with real models: the paired evidence of a candidate against its teacher on
held-out digits, and the acceptance rule on it (daemon/cycles/acceptance.py): a candidate that answers like
the teacher is accepted without a label; a deliberately under-trained control (pruned, never
retrained) is not, and the true labels of its disagreements reject it."""
from __future__ import annotations

import copy

import pytest
import torch

from daemon.cycles.acceptance import Acceptance, Verdict, decide
from prune_core import ModelCard, TrainConfig, build_model, split_holdout, train
from prune_core.criteria import get_criterion
from prune_core.datasets import MNIST_CLASSES, mnist5k
from prune_core.judging import judge_pairs
from prune_core.surgery import PruneSpec, prune_to_level

pytestmark = pytest.mark.slow  # a teacher trained for the module (~20 s on 2 shared cores)
RULE = Acceptance(max_drop=0.01, min_gain=0.05, min_agreement=0.99, min_label_evidence=200)
SUMMARY = {"params_before": 1000, "params_after": 500, "top1_before": float("nan"), "top1_after": float("nan"),
           "agreement_with_before": float("nan"), "evidence": "agreement", "teacher": {"corrected": True}}


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    digits = mnist5k(32)
    train_set, held = split_holdout(digits.subset(range(2000)), 0.3)  # ~600 judging samples: 0 disagreements bound the loss below 1 %
    card = ModelCard("cifar_small", 10, MNIST_CLASSES, 32)
    teacher = build_model("cifar_small", 10)
    train(teacher, train_set, None, card.mean, card.std, TrainConfig(epochs=1, lr=0.05, flip=False))
    unlabelled = copy.copy(held)
    unlabelled.labels = torch.full_like(held.labels, -1)
    return teacher.eval(), card, held, unlabelled


def test_a_candidate_answering_like_the_teacher_is_accepted_without_labels(setting):
    teacher, card, held, unlabelled = setting
    ev = judge_pairs(copy.deepcopy(teacher), teacher, unlabelled, held, card.mean, card.std)
    assert ev.samples == len(held) > 500 and ev.disagreements == 0 and ev.expected_loss == 0 and ev.asked == ()
    assert ev.calibration.labelled == len(held) and 0 < ev.calibration.correct <= len(held)
    decision = decide(SUMMARY, RULE, ev)
    assert decision.accepted and "0 disagreements in" in decision.reason


def test_an_under_trained_control_is_pending_and_its_true_labels_reject_it(setting):
    teacher, card, held, unlabelled = setting
    scores = get_criterion("l1").score(teacher)
    control = prune_to_level(teacher, scores, PruneSpec(0.5), card.input_size).model.eval()  # never retrained
    ev = judge_pairs(control, teacher, unlabelled, held.subset(range(0)), card.mean, card.std, max_asked=60, seed=3)
    assert ev.disagreements > 0.1 * ev.samples and len(ev.asked) == 60
    assert len({d.key for d in ev.asked}) == 60 and all(d.teacher != d.candidate for d in ev.asked)
    decision = decide(SUMMARY, RULE, ev)
    assert decision.pending, decision.reason
    truth = dict(zip(held.keys, held.labels.tolist()))
    labels = {}
    for d in ev.asked:  # the labels arrive one at a time; each re-check is valid (confidence sequence)
        labels[d.key] = truth[d.key]
        decision = decide(SUMMARY, RULE, ev, labels)
        if not decision.pending:
            break
    assert decision.verdict is Verdict.REJECTED, decision.reason
    assert "worse than max_accuracy_drop" in decision.reason and len(labels) < 60
