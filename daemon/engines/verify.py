"""The verification rule: an engine may serve only if it answers like torch on real images.

Outputs must lie within a tolerance of torch's logits, and top-1 must be identical on every image
where torch's top-1 is decisive (its margin over the runner-up exceeds twice the tolerance; a
near-tie can flip under any legitimate rounding and is counted, not failed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .base import Precision, Verification


@dataclass(frozen=True)
class Tolerance:
    """Allowed |engine − torch| on logits: `atol` plus `rtol` times the largest |torch logit|."""

    atol: float
    rtol: float

    def allowed(self, reference: np.ndarray) -> float:
        return float(self.atol + self.rtol * np.max(np.abs(reference)))


# FP32: the engine runs the same float32 graph with other kernels (summation order, fused BN).
# FP16 (TensorRT): 11-bit mantissas; a stated, looser bound.
TOLERANCES = {Precision.FP32: Tolerance(atol=1e-4, rtol=1e-5), Precision.FP16: Tolerance(atol=2e-2, rtol=1e-2)}


def compare(reference: np.ndarray, got: np.ndarray, tolerance: Tolerance) -> Verification:
    """Measure `got` (engine logits) against `reference` (torch logits) for the same images."""
    if got.shape != reference.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(f"engine output shape {got.shape} differs from torch's {reference.shape} (or is empty)")
    allowed = tolerance.allowed(reference)
    diff = float(np.max(np.abs(got.astype(np.float64) - reference))) if np.all(np.isfinite(got)) else float("inf")
    if reference.shape[1] > 1:
        top2 = np.sort(reference, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * allowed
    else:
        decisive = np.ones(reference.shape[0], dtype=bool)
    same = reference.argmax(1) == got.argmax(1)
    return Verification(
        images=int(reference.shape[0]), max_abs_diff=diff, allowed_diff=allowed, top1_agreement=float(same.mean()),
        near_ties=int((~decisive).sum()), top1_mismatches=int((decisive & ~same).sum()),
    )


def failure(v: Verification) -> Optional[str]:
    """Why the engine failed verification, or None when it passed."""
    if v.top1_mismatches:
        return f"top-1 differs from torch on {v.top1_mismatches} of {v.images} images (not near-ties)"
    if not v.max_abs_diff <= v.allowed_diff:
        return f"logits differ from torch by {v.max_abs_diff:.3g} (allowed {v.allowed_diff:.3g}) on {v.images} images"
    return None
