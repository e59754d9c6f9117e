"""The teacher a cycle learns from on unlabelled traffic: the served model with its logits calibrated
and moved to the device's class prior, folded into its classifier layer.

Folding keeps the teacher one plain network of the served architecture, so ranking, pruning,
distillation and evaluation treat it exactly like the served model: the pruned student then learns
the device's class distribution instead of copying the served model's confusions.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .architectures import classifier_module
from .model_format import ModelCard


class FoldError(ValueError):
    """The model's logits are not an affine function of its classifier layer (e.g. a ReLU or pooling follows it)."""


def prior_offset(source_prior: Sequence[float], target_prior: Sequence[float], floor: float = 1e-3) -> torch.Tensor:
    """log(target / source) per class, both clamped below at `floor`: added to calibrated logits it
    turns p(y|x) under the source prior into p(y|x) under the target prior (Saerens et al. 2002)."""
    source = torch.tensor(source_prior, dtype=torch.float64).clamp_min(floor)
    target = torch.tensor(target_prior, dtype=torch.float64).clamp_min(floor)
    return (torch.log(target / target.sum()) - torch.log(source / source.sum())).float()


@torch.no_grad()
def fold_logit_transform(model: nn.Module, scale: float, offset: torch.Tensor, input_size: int) -> nn.Module:
    """A copy of `model` whose logits are `model(x) * scale + offset`.

    The classifier layer (prune_core.architectures.classifier_module) is rescaled and its bias shifted;
    the result is checked on a random batch, and FoldError is raised where the classifier is not the
    network's last operation (squeezenet's final conv is followed by a ReLU)."""
    folded = copy.deepcopy(model).eval()
    layer = classifier_module(folded)
    out = layer.weight.shape[0]
    if offset.numel() != out:
        raise FoldError(f"offset has {offset.numel()} classes, the classifier {out}")
    offset = offset.to(layer.weight.device, layer.weight.dtype)
    layer.weight.mul_(scale)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(out, device=layer.weight.device, dtype=layer.weight.dtype))
    layer.bias.mul_(scale).add_(offset)
    probe = torch.randn(4, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(layer.weight.device)
    reference = copy.deepcopy(model).eval()
    expected = reference(probe) * scale + offset
    got = folded(probe)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-4):
        raise FoldError(f"the logits of {type(model).__name__} are not an affine function of its classifier layer")
    return folded


@torch.no_grad()
def samples_prior(model: nn.Module, card: ModelCard, data, batch_size: int = 256, init: Sequence[float] | None = None) -> list[float]:
    """The class prior of the samples `data` (an ImageSet) by EM (Saerens et al. 2002) over the model's
    calibrated outputs on them: what a cycle's teacher is corrected to, so the teacher matches the samples
    its student trains on rather than whatever traffic the daemon's estimate last held. `init` warm-starts EM."""
    from .data import batches
    from .label_shift import em_prior

    device = next(model.parameters()).device
    model.eval()
    logits = torch.cat([model(x.to(device)).double().cpu() for x, _ in batches(data, batch_size, card.mean, card.std, device="cpu")])
    probs = card.calibration().apply(logits.numpy())
    return [float(v) for v in em_prior(probs, card.prior(), max_iter=200, tol=1e-7, init=init)]


@dataclass
class Teacher:
    """The model a cycle starts from and distils, the card its student will carry, and how it was made."""

    model: nn.Module
    student_card: ModelCard
    corrected: bool  # calibration and prior shift folded in
    note: str  # what was done, or why not


def corrected_teacher(model: nn.Module, card: ModelCard, target_prior: Sequence[float] | None, floor: float = 1e-3) -> Teacher:
    """The served model calibrated (card.temperature, card.logit_bias) and shifted from its class prior
    to `target_prior` (the traffic's estimate), folded into its classifier.

    Its student learns calibrated probabilities under the target prior, so the student's card records
    temperature 1, no bias and the (floored) target prior. Without a target prior, or where folding is
    impossible, the teacher is the served model as it is."""
    if target_prior is None:
        return Teacher(model, copy.deepcopy(card), False, "no prior estimate: the served model as it is")
    calibration = card.calibration()
    offset = prior_offset(card.prior(), target_prior, floor) + torch.tensor(card.bias())
    try:
        folded = fold_logit_transform(model, 1.0 / calibration.temperature, offset, card.input_size)
    except FoldError as exc:
        return Teacher(model, copy.deepcopy(card), False, f"not corrected: {exc}")
    student = copy.deepcopy(card)
    target = torch.tensor(target_prior, dtype=torch.float64).clamp_min(floor)
    student.temperature, student.logit_bias, student.confusion = 1.0, [], []
    student.class_prior = [float(v) for v in target / target.sum()]
    top = sorted(zip(student.class_prior, card.class_names), reverse=True)[:3]
    note = f"calibrated (T={calibration.temperature:.2f}) and shifted to the traffic's prior (" + ", ".join(f"{n} {p:.0%}" for p, n in top) + ")"
    return Teacher(folded, student, True, note)
