"""prune_core.self_training and TrainConfig.unlabelled = self_train: present classes, restriction,
pseudo-label thresholding, the strong view, the objective per row, and training with real models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prune_core import CycleConfig, ModelCard, build_model, run_cycle
from prune_core.options import UnlabelledObjective
from prune_core.retrain import TrainConfig, distillation_loss, train
from prune_core.self_training import MASKED, present_classes, pseudo_labels, restrict, strong_augment
from test_retrain import MEAN, STD, digits  # noqa: F401 (digits: a fixture, classes 0-3)

SELF = UnlabelledObjective.SELF_TRAIN


def test_present_classes_keeps_shares_above_the_floor_and_never_masks_everything():
    assert present_classes([0.5, 0.3, 0.04, 0.16], 0.05).tolist() == [True, True, False, True]
    assert present_classes([5, 3, 0.4, 1.6], 0.05).tolist() == [True, True, False, True]  # normalised first
    assert present_classes([0.25] * 4, 0.5).tolist() == [True] * 4  # none reaches it: nothing is masked


def test_restrict_moves_the_argmax_to_present_classes_and_stays_finite():
    z = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    present = torch.tensor([False, True, True])
    r = restrict(z, present)
    assert r.argmax(1).tolist() == [1, 2] and torch.isfinite(r).all() and r[0, 0] == MASKED
    assert restrict(z, None) is z


def test_pseudo_labels_are_confident_only_above_the_threshold():
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    got = pseudo_labels(p.log(), 0.8)
    assert got.labels.tolist() == [0, 0, 1]
    assert got.confident.tolist() == [True, False, True]
    assert pseudo_labels(p.log(), 0.0).confident.all()


def test_self_training_objective_per_row():
    """Every row as distillation; confident unlabelled rows add cross-entropy on the pseudo-label, on the
    strong view's logits where given; labelled rows never do."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=gen), torch.tensor([[4.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 0.0]])
    strong = torch.randn(4, 3, generator=gen)
    y = torch.tensor([-1, -1, 1, -1])  # row 2 labelled (its confident teacher does not matter)
    cfg = TrainConfig(unlabelled=SELF, confidence=0.8, temperature=2.0, distill_weight=0.5)
    distil = TrainConfig(temperature=2.0, distill_weight=0.5)
    base = distillation_loss(s, y, t, distil)
    for view in (None, strong):
        ce = F.cross_entropy(s if view is None else view, torch.tensor([0, 0, 1, 1]), reduction="none")
        expected = base + (ce[0] + ce[3]) / 4
        assert distillation_loss(s, y, t, cfg, view).item() == pytest.approx(expected.item(), rel=1e-5)
    # with every row unconfident it is plain distillation
    strict = TrainConfig(unlabelled=SELF, confidence=1.0, temperature=2.0, distill_weight=0.5)
    assert distillation_loss(s, y, t, strict, strong).item() == pytest.approx(base.item(), rel=1e-6)


def test_strong_view_is_reproducible_in_range_and_really_different(digits):
    raw = digits.subset(range(8)).images.float() / 255
    m, s = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    x = (raw - m) / s
    a = strong_augment(x, MEAN, STD, torch.Generator().manual_seed(1))
    b = strong_augment(x, MEAN, STD, torch.Generator().manual_seed(1))
    c = strong_augment(x, MEAN, STD, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    back = a * s + m
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    # every image carries a cutout square of grey, 16×16 on 32×32 (up to clipping at the border)
    grey = ((back - 0.5).abs() < 1e-5).all(1)
    assert all(int(grey[i].sum()) >= 64 for i in range(8))
    assert (a - x).abs().mean() > 0.1


def _biased(model: torch.nn.Module, cls: int, bias: float) -> torch.nn.Module:
    """A copy whose classifier favours `cls` by `bias` logits."""
    from prune_core.architectures import classifier_module

    out = copy.deepcopy(model)
    with torch.no_grad():
        classifier_module(out).bias[cls] += bias
    return out.eval()


@pytest.fixture(scope="module")
def trained(digits):
    """cifar_small trained on the labelled digits 0-3."""
    torch.manual_seed(0)
    model = build_model("cifar_small", 4)
    train(model, digits.subset(range(64)), None, MEAN, STD, TrainConfig(epochs=4, batch_size=32, lr=0.05, seed=3, flip=False))
    return model.eval()


def _share_of(model, data, cls: int) -> float:
    from prune_core.data import batches

    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in batches(data, 64, MEAN, STD)])
    return float((pred == cls).double().mean())


@pytest.mark.parametrize("present, few", [(torch.tensor([True, True, True, False]), True), (None, False)])
def test_self_training_learns_only_present_classes(digits, trained, present, few):
    """A teacher that answers class 3 almost always; the traffic holds 0-2. Restricted to them, its
    pseudo-labels retrain a student (its copy) away from 3; unrestricted, the student keeps answering 3."""
    teacher = _biased(trained, 3, 8.0)
    unlabelled = digits.subset(torch.nonzero(digits.labels < 3).flatten())
    unlabelled.labels[:] = -1
    train_set, held = unlabelled.subset(range(48)), unlabelled.subset(range(48, len(unlabelled)))
    assert _share_of(teacher, held, 3) > 0.8
    student = copy.deepcopy(teacher)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=3, flip=False, unlabelled=SELF, confidence=0.5)
    result = train(student, train_set, held, MEAN, STD, cfg, teacher=teacher, present=present)
    share = _share_of(student, held, 3)
    assert (share < 0.2) if few else (share > 0.5)
    assert all(0.0 <= e.val_score <= 1.0 for e in result.history)


def test_cycle_self_trains_on_the_classes_of_the_cards_prior(digits, trained):
    """run_cycle restricts self-training to the classes the card's prior (the traffic's estimate) holds, and records it."""
    unlabelled = [part.subset(range(len(part))) for part in (digits.subset(range(64)), digits.subset(range(64, 96)))]
    for part in unlabelled:
        part.labels[:] = -1
    card = ModelCard("cifar_small", 4, list("abcd"), 32, mean=MEAN, std=STD, class_prior=[0.4, 0.3, 0.28, 0.02])
    cfg = CycleConfig(level=0.5, criterion="l1", calibration_batches=1,
                      train=TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=1, flip=False, unlabelled="self_train"))
    s = run_cycle(trained, card, *unlabelled, cfg).summary
    assert s["unlabelled_objective"] == "self_train" and s["present_classes"] == ["a", "b", "c"]
    ca = s["confident_agreement"]
    assert 0.0 <= ca["share"] <= 1.0 and ca["samples"] == 32 and s["params_after"] < s["params_before"]


def test_unlabelled_objective_is_checked():
    with pytest.raises(ValueError, match="self_train"):
        TrainConfig(unlabelled="fixmatch")
    with pytest.raises(ValueError):
        TrainConfig(confidence=1.5)
    assert TrainConfig(unlabelled="self_train").unlabelled is SELF
