"""Mixed views for function matching (Beyer et al., CVPR 2022, arXiv 2106.05237): every batch is
mixed (mixup or CutMix) after its crop and flip, and the teacher is asked on the very same mixed
view the student sees, so the student matches the teacher's function on points between images,
not only on the few hundred images a device buffer holds."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch


class Mix(str, Enum):
    NONE = "none"
    MIXUP = "mixup"
    CUTMIX = "cutmix"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: x = lam·x + (1−lam)·x[partner] (mixup), or x[partner]'s box pasted into x
    (CutMix, lam the share of pixels kept)."""

    x: torch.Tensor
    partner: torch.Tensor  # row index of each row's partner
    lam: float


def mix_batch(x: torch.Tensor, how: Mix, alpha: float, rng: np.random.Generator) -> Mixed:
    """Mix a normalised float batch by `how`, lam ~ Beta(alpha, alpha), partners a random permutation.
    The same draws are taken from `rng` whatever `how` is, so a resumed epoch replays the same views."""
    n = x.shape[0]
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(n)).to(x.device)
    cy, cx = rng.random(2)
    how = Mix(how)
    if how is Mix.NONE or n < 2:
        return Mixed(x, torch.arange(n, device=x.device), 1.0)
    if how is Mix.MIXUP:
        return Mixed(lam * x + (1 - lam) * x[partner], partner, lam)
    h, w = x.shape[-2:]
    cut = (1 - lam) ** 0.5
    bh, bw = int(round(h * cut)), int(round(w * cut))
    y0, x0 = int(cy * (h - bh + 1)), int(cx * (w - bw + 1))
    out = x.clone()
    out[..., y0:y0 + bh, x0:x0 + bw] = x[partner][..., y0:y0 + bh, x0:x0 + bw]
    return Mixed(out, partner, 1 - (bh * bw) / (h * w))
