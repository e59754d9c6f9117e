"""Where tensors run: a Jetson's (or any) CUDA GPU when present, the CPU otherwise."""
from __future__ import annotations

import os

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return `prefer` ('cpu', 'cuda', 'cuda:1') or, by default, CUDA when available else CPU.

    `EDGETUNE_DEVICE` overrides the default so a deployment can pin the CPU without code changes.
    """
    choice = prefer or os.environ.get("EDGETUNE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{choice}' requested but CUDA is not available")
    return device
