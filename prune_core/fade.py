"""Fade out the channels a prune will remove while the rest of the network trains, then remove them.

Removing most of a network's channels at once (levels 0.8-0.9) throws away features the
surviving channels were built on, and a few epochs of retraining the small network cannot
rebuild them. Scaling the doomed channels' parameters down to zero over a few epochs, while the
whole network keeps training, lets the survivors take over their work with the full network's
capacity still there; at zero the channels contribute nothing, so removing them is exact.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


class ChannelFade:
    """Scales the output channels `removed` names ({layer: channel indices}, from
    `surgery.removed_channels`) of `model` to `scale` times their values when the fade began."""

    def __init__(self, model: nn.Module, removed: Dict[str, List[int]]):
        self.slices = []
        for name, idxs in removed.items():
            module = model.get_submodule(name)
            index = torch.as_tensor(idxs, dtype=torch.long)
            for attr in ("weight", "bias"):
                param = getattr(module, attr, None)
                if isinstance(param, torch.Tensor) and param.dim() >= 1:
                    i = index.to(param.device)
                    self.slices.append((param, i, param.detach()[i].clone()))

    @torch.no_grad()
    def apply(self, scale: float) -> None:
        """Set the fading channels to `scale` (1 = as they were, 0 = gone) of their start values."""
        for param, index, start in self.slices:
            param[index] = start * scale

    def schedule(self, done: float) -> None:
        """A `train` step hook: linear fade, reaching zero when the run is done."""
        self.apply(max(0.0, 1.0 - done))
