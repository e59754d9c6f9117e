"""Where tensors run: a Jetson's (or any) CUDA GPU when present, the CPU otherwise."""
from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DRIVER_LIBRARY = "libcuda.so.1"


def cuda_driver_devices() -> int:
    """How many CUDA devices the driver reports (0 without a driver), asked without torch: the
    serving process names its device before it knows whether it needs torch at all."""
    try:
        cuda = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def device_name(prefer: str | None = None) -> str:
    """`prefer` ('cpu', 'cuda', 'cuda:1'), else `EDGETUNE_DEVICE`, else 'cuda' when the driver
    reports a GPU, else 'cpu'; ValueError for a CUDA device the driver does not report. No torch
    (`pick_device` is the same choice where torch runs)."""
    choice = prefer or os.environ.get("EDGETUNE_DEVICE") or ("cuda" if cuda_driver_devices() > 0 else "cpu")
    if choice.startswith("cuda") and cuda_driver_devices() == 0:
        raise ValueError(f"device '{choice}' requested but CUDA is not available")
    return choice


def pick_device(prefer: str | None = None) -> "torch.device":
    """Return `prefer` ('cpu', 'cuda', 'cuda:1') or, by default, CUDA when available else CPU.

    `EDGETUNE_DEVICE` overrides the default so a deployment can pin the CPU without code changes.
    """
    import torch

    choice = prefer or os.environ.get("EDGETUNE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{choice}' requested but CUDA is not available")
    return device
