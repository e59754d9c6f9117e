"""A cycle on unlabelled samples: the teacher folded with a prior shift, and probes judged by agreement."""
from __future__ import annotations

import pytest
import torch

from prune_core import CycleConfig, ModelCard, TrainConfig, build_model, run_cycle, train
from prune_core.teacher import FoldError, fold_logit_transform, prior_offset
from test_cycle import MEAN, STD, digits  # noqa: F401 (digits: a fixture)


@pytest.fixture(scope="module")
def unlabelled_digits(digits):
    """test_cycle's digits (classes 0-2, 180 to train on, 60 held out) with every label removed."""
    train, held = (part.subset(range(len(part))) for part in digits)
    train.labels[:] = -1
    held.labels[:] = -1
    return train, held


@pytest.mark.parametrize("arch", ["cifar_small", "resnet18", "mobilenet_v2"])
def test_fold_matches_the_transformed_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    offset = prior_offset([0.2] * 5, [0.5, 0.5, 0.0, 0.0, 0.0], floor=1e-3)
    folded = fold_logit_transform(model, 0.5, offset, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x) * 0.5 + offset
        assert torch.allclose(folded(x), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
        # the argmax moves to the favoured classes, and the original is untouched
        assert set(folded(x).argmax(1).tolist()) <= {0, 1}
    assert model is not folded


def test_prior_offset_floor_keeps_every_class_finite():
    offset = prior_offset([0.5, 0.5, 0.0], [1.0, 0.0, 0.0], floor=1e-3)
    assert torch.isfinite(offset).all()
    assert offset[0] > 0 > offset[1]


def test_a_classifier_followed_by_relu_is_refused():
    torch.manual_seed(0)
    model = build_model("squeezenet1_1", 4).eval()
    with pytest.raises(FoldError, match="not an affine function"):
        fold_logit_transform(model, 1.0, prior_offset([0.25] * 4, [0.7, 0.1, 0.1, 0.1]), 64)


def test_level_search_without_labels_judges_probes_by_agreement(unlabelled_digits):
    """With no labels anywhere the probes used to score NaN and all were infeasible; now each is judged by
    agreement with the teacher, so the search keeps a pruned model and says which evidence decided."""
    torch.manual_seed(0)
    model = build_model("cifar_small", 10).eval()
    card = ModelCard("cifar_small", 10, [str(i) for i in range(10)], 32, mean=MEAN, std=STD)
    train = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=1, flip=False)
    config = CycleConfig(level="auto", criterion="l1", train=train, calibration_batches=2, tolerance=1.0)
    result = run_cycle(model, card, *unlabelled_digits, config)
    s = result.summary
    assert s["evidence"] == "agreement"
    probes = s["probes"]
    assert probes and all(0.0 <= p["accuracy"] <= 1.0 for p in probes)
    # a tolerance of 1.0 makes every probe feasible: the search must climb to the grid's top
    assert all(p["feasible"] for p in probes) and s["level"] == pytest.approx(0.95)
    assert s["params_after"] < s["params_before"]


def test_card_records_calibration_and_prior_and_reads_old_cards():
    from prune_core.model_format import ModelCard, ModelFormatError

    card = ModelCard("cifar_small", 3, ["a", "b", "c"], 32, temperature=1.7, logit_bias=[0.1, 0.0, -0.1], class_prior=[0.5, 0.25, 0.25])
    back = ModelCard.from_json(card.to_json())
    assert (back.temperature, back.logit_bias, back.prior()) == (1.7, [0.1, 0.0, -0.1], [0.5, 0.25, 0.25])
    old = card.to_json()
    for key in ("temperature", "logit_bias", "class_prior"):
        del old[key]
    legacy = ModelCard.from_json(old)
    assert legacy.temperature == 1.0 and legacy.bias() == [0.0] * 3 and legacy.prior() == pytest.approx([1 / 3] * 3)
    for bad in ({"temperature": 0}, {"class_prior": [1.0, 0.0]}, {"logit_bias": [0.0]}, {"class_prior": [-1.0, 1.0, 1.0]}):
        with pytest.raises(ModelFormatError):
            ModelCard.from_json({**card.to_json(), **bad})


def test_calibrated_card_fits_temperature_prior_and_confusion():
    """Logits scaled by 10 need a temperature 10 times larger; the prior is the training labels', the
    confusion counts the labelled held-out samples."""
    from prune_core.calibrate import calibrated_card
    from prune_core.datasets import mnist5k

    data = mnist5k(32)
    keep = torch.nonzero(data.labels < 4).flatten()[:300]
    data = data.subset(keep)
    held = data.subset(range(200, 300))
    held.labels[:10] = -1  # unlabelled held-out samples are ignored
    held.labels[10:30] = (held.labels[10:30] + 1) % 4  # wrong labels: no temperature separates them perfectly
    torch.manual_seed(0)
    model = build_model("cifar_small", 4)
    card = ModelCard("cifar_small", 4, list("abcd"), 32, mean=MEAN, std=STD)
    train(model, data.subset(range(200)), None, MEAN, STD, TrainConfig(epochs=3, batch_size=32, lr=0.05, flip=False))
    train_labels = torch.tensor([0] * 6 + [1] * 2 + [2] + [3])
    fitted = calibrated_card(model, card, held, train_labels)
    sharp = calibrated_card(fold_logit_transform(model, 10.0, torch.zeros(4), 32), card, held, train_labels)
    assert sharp.temperature == pytest.approx(10 * fitted.temperature, rel=0.05)
    assert fitted.prior() == pytest.approx([0.6, 0.2, 0.1, 0.1])
    assert sum(map(sum, fitted.confusion)) == 90 and fitted.logit_bias == []  # temperature scaling: no biases
    assert card.temperature == 1.0  # the input card is untouched
    with pytest.raises(ValueError, match="labelled"):
        calibrated_card(model, card, _unlabelled(held))


def _unlabelled(data):
    data = data.subset(range(len(data)))
    data.labels[:] = -1
    return data


def test_corrected_teacher_favours_the_traffic_classes_and_its_student_card_records_the_prior():
    from prune_core.teacher import corrected_teacher

    torch.manual_seed(0)
    model = build_model("cifar_small", 3).eval()
    card = ModelCard("cifar_small", 3, list("abc"), 32, temperature=2.0, logit_bias=[0.0, 0.1, -0.1], confusion=[[1, 0, 0]] * 3)
    teacher = corrected_teacher(model, card, [0.0, 0.5, 0.5])
    assert teacher.corrected and "T=2.00" in teacher.note
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        raw, got = model(x), teacher.model(x)
    offset = torch.log(torch.tensor([1e-3, 0.5, 0.5]).clamp_min(1e-3) / torch.tensor([1e-3, 0.5, 0.5]).clamp_min(1e-3).sum()) - torch.log(torch.tensor([1 / 3] * 3))
    assert torch.allclose(got, raw / 2.0 + torch.tensor([0.0, 0.1, -0.1]) + offset, atol=1e-4)
    s = teacher.student_card
    assert s.temperature == 1.0 and s.logit_bias == [] and s.confusion == [] and s.prior()[0] < 0.01
    plain = corrected_teacher(model, card, None)
    assert not plain.corrected and plain.model is model and plain.student_card.temperature == 2.0


def test_calibrate_command_writes_temperature_prior_and_confusion(tmp_path, mnist_folder, capsys):
    import json

    from prune_core.cli import run
    from prune_core.model_format import read_card, save_model

    torch.manual_seed(0)
    names = sorted(p.name for p in mnist_folder.iterdir() if p.is_dir())
    model = build_model("cifar_small", len(names))
    save_model(model, ModelCard("cifar_small", len(names), names, 32, mean=MEAN, std=STD), tmp_path / "m")
    assert run(["calibrate", str(tmp_path / "m"), "--data", str(mnist_folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    card = read_card(tmp_path / "m")
    assert out["temperature"] == card.temperature > 0
    assert sum(map(sum, card.confusion)) == out["samples"] and card.prior() == pytest.approx(list(out["class_prior"].values()))
    assert run(["calibrate", str(tmp_path / "nope"), "--data", str(mnist_folder)]) == 2


def test_the_teacher_is_corrected_to_the_prior_of_its_own_samples(unlabelled_digits):
    """samples_prior: EM over the served model's calibrated outputs on the cycle's training samples (normalised
    as the model expects), the same as EM on those logits computed by hand."""
    from prune_core.architectures import classifier_module
    from prune_core.data import batches
    from prune_core.label_shift import em_prior
    from prune_core.teacher import samples_prior

    torch.manual_seed(0)
    model = build_model("cifar_small", 3).eval()
    with torch.no_grad():
        classifier_module(model).bias.copy_(torch.tensor([0.0, 3.0, 0.0]))  # answers lean to class b
    card = ModelCard("cifar_small", 3, list("abc"), 32, mean=MEAN, std=STD, temperature=2.0)
    train, _ = unlabelled_digits
    q = samples_prior(model, card, train)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches(train, 64, MEAN, STD)]).double().numpy()
    expected = em_prior(card.calibration().apply(logits), card.prior(), max_iter=200, tol=1e-7)
    assert abs(sum(q) - 1) < 1e-9 and max(abs(a - b) for a, b in zip(q, expected)) < 1e-4
    assert q[1] > 0.5
