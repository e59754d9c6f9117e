"""The torch backend as an Engine: the model itself, eager. The reference every built engine is
verified against, and a candidate for `auto` where the caller already holds torch."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .base import Backend, Engine, InputSpec


class TorchEngine(Engine):
    backend = Backend.TORCH

    def __init__(self, model: nn.Module, spec: InputSpec, device: Optional[torch.device] = None):
        super().__init__(spec)
        self.torch_device = device or next(model.parameters()).device
        self.model = model.to(self.torch_device).eval()
        self._scale = tuple(torch.from_numpy(v).to(self.torch_device) for v in (self._mean, self._std))

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def name(self) -> str:
        d = self.torch_device
        return f"torch ({d.type}, {torch.get_num_threads()} threads)" if d.type == "cpu" else f"torch ({d})"

    @torch.inference_mode()
    def logits(self, batch_uint8: np.ndarray) -> np.ndarray:
        """Normalised on the model's device (uint8 crosses to a GPU, not float32), in the same
        float32 arithmetic as the numpy path."""
        self.check(batch_uint8)
        mean, std = self._scale
        x = (torch.from_numpy(batch_uint8).to(self.torch_device).float() - mean) / std
        return self.model(x).float().cpu().numpy()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(x).to(self.torch_device)).float().cpu().numpy()
