"""Self-training on unlabelled samples (UnlabelledObjective.SELF_TRAIN), after FixMatch (Sohn et al.
2020) and Noisy Student (Xie et al. 2020): the pieces retraining combines.

- The classes present: those whose share in the traffic's estimated prior reaches a floor. The
  teacher's answers are restricted to them, which gives the student what an oracle mask of the
  device's classes would give, estimated without labels.
- Pseudo-labels: the restricted teacher's argmax on the plain (weakly augmented) view, kept where its
  probability reaches a threshold.
- A strong view of the same image for the student to learn them on: translation with padding, flip,
  brightness/contrast/saturation jitter and cutout, torch ops on the normalised batch. Agreeing with
  a confident teacher on a view the teacher never saw is how FixMatch's student outgrows its labels;
  whether a pruned student outgrows its teacher this way is measured in bench/RESULTS.md.

retrain.train distils the restricted teacher on the plain view of every unlabelled sample and adds the
pseudo-label's cross-entropy on the strong view, both views in one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MASKED = -1e4  # the logit an absent class gets: exp() of it is 0, yet it stays finite for the KL term


def present_classes(prior: Sequence[float], share: float) -> torch.Tensor:
    """A bool mask of the classes whose share of `prior` (normalised) is at least `share`; all of
    them if none is (a flat or missing estimate must not mask everything)."""
    p = torch.as_tensor(prior, dtype=torch.float64).clamp_min(0)
    present = p / p.sum() >= share
    return present if present.any() else torch.ones_like(present)


def restrict(logits: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """`logits` with every absent class pushed to MASKED (unchanged where `present` is None)."""
    if present is None:
        return logits
    return logits.masked_fill(~present.to(logits.device), MASKED)


@dataclass
class PseudoLabels:
    labels: torch.Tensor  # the restricted teacher's argmax per row
    confident: torch.Tensor  # bool: its probability reaches the threshold


def pseudo_labels(teacher_logits: torch.Tensor, threshold: float) -> PseudoLabels:
    """Hard labels from (already restricted) teacher logits, and which of them are confident enough to train on."""
    confidence, labels = teacher_logits.softmax(1).max(1)
    return PseudoLabels(labels, confidence >= threshold)


def strong_augment(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], gen: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """A strongly augmented copy of a normalised batch (N, C, H, W): per image a random translation by up
    to 1/8 of the side (zero padding), a horizontal flip (if `flip`), brightness, contrast and saturation
    each scaled by a factor in [0.6, 1.4], and a cutout square of half the side filled with grey."""
    n, c, h, w = x.shape
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    raw = x * s + m  # in [0, 1]
    rand = lambda *shape: torch.rand(*shape, generator=gen).to(x.device)  # noqa: E731 (one generator: reproducible on any device)
    # colour: brightness, contrast (around the image's mean grey), saturation (towards its grey)
    grey_w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) if c == 3 else None
    raw = raw * (0.6 + 0.8 * rand(n, 1, 1, 1))
    grey = (raw * grey_w).sum(1, keepdim=True) if grey_w is not None else raw.mean(1, keepdim=True)
    raw = grey.mean((2, 3), keepdim=True) + (raw - grey.mean((2, 3), keepdim=True)) * (0.6 + 0.8 * rand(n, 1, 1, 1))
    if grey_w is not None:
        grey = (raw * grey_w).sum(1, keepdim=True)
        raw = grey + (raw - grey) * (0.6 + 0.8 * rand(n, 1, 1, 1))
    raw = raw.clamp(0, 1)
    # translation with zero padding
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(raw, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    raw = torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])
    if flip:
        mirror = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        raw = torch.where(mirror[:, None, None, None], raw.flip(3), raw)
    # cutout: a square of half the side, centred anywhere (clipped at the border)
    side = max(1, h // 2)
    cy = torch.randint(0, h, (n,), generator=gen).tolist()
    cx = torch.randint(0, w, (n,), generator=gen).tolist()
    raw = raw.clone()
    for i in range(n):
        y0, x0 = max(0, cy[i] - side // 2), max(0, cx[i] - side // 2)
        raw[i, :, y0: cy[i] + side - side // 2, x0: cx[i] + side - side // 2] = 0.5
    return (raw - m) / s


@dataclass
class ConfidentAgreement:
    agreement: float  # share of the confident samples on which the student answers the restricted teacher's pseudo-label
    share: float  # share of the samples on which the restricted teacher is confident
    samples: int


@torch.no_grad()
def confident_agreement(student, teacher, batches, present: torch.Tensor | None, threshold: float) -> ConfidentAgreement:
    """How a self-trained student agrees with its teacher where self-training trusted the teacher: on the
    samples whose restricted teacher answer reaches `threshold`. A student that outgrows its teacher departs
    from it where it was unsure; departing where it was confident is what this measures."""
    states = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    same = confident = total = 0
    for x, _ in batches:
        pseudo = pseudo_labels(restrict(teacher(x), present), threshold)
        same += int((student(x).argmax(1) == pseudo.labels)[pseudo.confident].sum())
        confident += int(pseudo.confident.sum())
        total += x.shape[0]
    student.train(states[0])
    teacher.train(states[1])
    return ConfidentAgreement(same / confident if confident else float("nan"), confident / total if total else float("nan"), total)
