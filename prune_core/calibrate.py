"""Calibrate a model on its labelled held-out split and record it in its card: the temperature and
biases its probabilities need (label_shift.fit_calibration), the class prior it was trained under, and
its confusion matrix (for BBSE). Temperature scaling by default: BCTS calibrates a little
better but its per-class biases corrected the prior worse (bench/RESULTS.md, label shift). Done when a model is trained or imported, before it is served."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .data import ImageSet, batches
from .label_shift import CalibrationMethod, class_prior, confusion_matrix, fit_calibration
from .model_format import ModelCard

MAX_CONFUSION_CLASSES = 100  # a K×K matrix in model.json: beyond this it is not kept (no BBSE)


@torch.no_grad()
def logits_of(model: nn.Module, data: ImageSet, card: ModelCard, batch_size: int = 256) -> torch.Tensor:
    """The model's logits for every sample of `data`, in order (N×K, on the CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(x).float().cpu() for x, _ in batches(data, batch_size, card.mean, card.std, device=device)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, card.num_classes)


def calibrated_card(
    model: nn.Module,
    card: ModelCard,
    held_set: ImageSet,
    train_labels: torch.Tensor | None = None,
    method: CalibrationMethod = CalibrationMethod.TEMPERATURE,
) -> ModelCard:
    """A copy of `card` with calibration, class prior and confusion fitted on `held_set`'s labelled
    samples; the class prior is that of `train_labels` (the data the model learned), kept otherwise.
    ValueError when `held_set` has no labelled sample."""
    labels = held_set.labels
    known = labels >= 0
    if not bool(known.any()):
        raise ValueError("calibration needs labelled held-out samples")
    logits = logits_of(model, held_set.subset(torch.nonzero(known).flatten()), card)
    labels = labels[known]
    calibration = fit_calibration(logits, labels, method)
    out = copy.deepcopy(card)
    out.temperature = calibration.temperature
    out.logit_bias = list(calibration.bias) if calibration.bias is not None else []
    if train_labels is not None and bool((train_labels >= 0).any()):
        out.class_prior = [float(v) for v in class_prior(train_labels, card.num_classes)]
    if card.num_classes <= MAX_CONFUSION_CLASSES:
        predicted = calibration.apply(logits).argmax(1)
        out.confusion = confusion_matrix(predicted, labels, card.num_classes).tolist()
    return out
