"""The paired evidence of a cycle's candidate against its teacher (prune_core.evidence.JudgingEvidence),
measured on the judging samples: one forward pass of each over them, and of the teacher over the
labelled samples it never learnt from, to check its calibration."""
from __future__ import annotations

import random

import torch
from torch import nn

from .data import ImageSet, batches
from .evidence import Calibration, Disagreement, JudgingEvidence


@torch.no_grad()
def _answers(model: nn.Module, data: ImageSet, mean, std, batch_size: int) -> torch.Tensor:
    """Softmax probabilities of `model` over `data`, in order (float64)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [torch.softmax(model(x).double(), 1).cpu() for x, _ in batches(data, batch_size, mean, std, device=device)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def calibration_of(teacher: nn.Module, labelled: ImageSet, mean, std, batch_size: int = 64) -> Calibration:
    """How often the teacher is right on the labelled samples of `labelled` against how often its own
    probabilities expect it to be."""
    keep = torch.nonzero(labelled.labels >= 0).flatten()
    if len(keep) == 0:
        return Calibration()
    data = labelled.subset(keep)
    p = _answers(teacher, data, mean, std, batch_size)
    top = p.max(1)
    return Calibration(len(data), int((top.indices == data.labels).sum()), float(top.values.sum()),
                       float((top.values * (1 - top.values)).sum()))


def judge_pairs(candidate: nn.Module, teacher: nn.Module, judging: ImageSet, labelled: ImageSet, mean, std,
                batch_size: int = 64, max_asked: int = 100, seed: int = 0) -> JudgingEvidence:
    """`candidate` against `teacher` on `judging` (samples that took no part in its training): the
    disagreements, the loss the teacher's probabilities p expect (the mean of p(teacher's answer) -
    p(candidate's answer), as measure.compare), the teacher's calibration on `labelled`, and up to
    `max_asked` disagreements in a random order (seeded) whose labels would decide."""
    p = _answers(teacher, judging, mean, std, batch_size)
    theirs = p.argmax(1)
    mine = _answers(candidate, judging, mean, std, batch_size).argmax(1)
    terms = p.gather(1, theirs[:, None]).squeeze(1) - p.gather(1, mine[:, None]).squeeze(1)
    n = len(judging)
    se = float(terms.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
    differ = torch.nonzero(mine != theirs).flatten().tolist()
    random.Random(seed).shuffle(differ)
    asked = tuple(Disagreement(judging.keys[i], int(theirs[i]), int(mine[i])) for i in differ[:max_asked])
    return JudgingEvidence(n, len(differ), float(terms.mean()) if n else float("nan"), se,
                           calibration_of(teacher, labelled, mean, std, batch_size), asked)
