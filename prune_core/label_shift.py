"""Label shift: calibrate a model's probabilities, estimate the class prior of unlabelled traffic, correct for it.

A model trained on one class distribution (the source prior) and served where the classes occur in other
proportions (the target prior, e.g. a camera that only ever sees three of ten classes) can be corrected
with no training and no labels: p_t(y|x) ∝ p_s(y|x) · q(y) / p(y) (Saerens et al. 2002). The target prior
q is estimated from unlabelled traffic, either by EM on calibrated probabilities (Saerens et al. 2002;
calibrate first, Alexandari et al. 2020) or from a labelled confusion matrix and the distribution of the
model's predictions on the traffic (BBSE, Lipton et al. 2018).

Everything here works on numpy arrays of probabilities or logits (N×K) and needs no torch, so the serving
process can use it; only `fit_calibration` (run where models are trained) imports torch. No model, daemon or
SQL code.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque

import numpy as np

# The smallest target prior share `correct` lets a class have, so a class absent from recent traffic can
# still win when it returns.
DEFAULT_FLOOR = 1e-3


class CalibrationMethod(str, enum.Enum):
    """How a model's logits are mapped to probabilities before the prior is estimated."""

    NONE = "none"  # softmax of the raw logits
    TEMPERATURE = "temperature"  # softmax(logits / T)
    BCTS = "bcts"  # softmax(logits / T + b): bias-corrected temperature scaling (Alexandari et al. 2020)


@dataclass(frozen=True)
class Calibration:
    """softmax(logits / temperature + bias); `bias` is None or one value per class (mean zero)."""

    temperature: float = 1.0
    bias: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, not {self.temperature}")
        if self.bias is not None and not all(math.isfinite(b) for b in self.bias):
            raise ValueError("bias values must be finite")

    @property
    def method(self) -> CalibrationMethod:
        if self.bias is not None:
            return CalibrationMethod.BCTS
        return CalibrationMethod.NONE if self.temperature == 1.0 else CalibrationMethod.TEMPERATURE

    def scaled(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated logits (N×K), in `logits`' float dtype (float32 for anything not float)."""
        x = np.asarray(logits)
        x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
        out = x / x.dtype.type(self.temperature)
        if self.bias is not None:
            if len(self.bias) != x.shape[-1]:
                raise ValueError(f"calibration has {len(self.bias)} biases, logits have {x.shape[-1]} classes")
            out = out + np.asarray(self.bias, dtype=x.dtype)
        return out

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities p(y|x) (N×K) from logits (N×K)."""
        return softmax(self.scaled(logits))

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "bias": None if self.bias is None else list(self.bias)}

    @classmethod
    def from_dict(cls, data: Any) -> "Calibration":
        """Parse `to_dict`'s output; raises ValueError on anything else."""
        if not isinstance(data, dict):
            raise ValueError("calibration must be an object with 'temperature' and 'bias'")
        temperature, bias = data.get("temperature", 1.0), data.get("bias")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError("calibration temperature must be a number")
        if bias is not None:
            if not isinstance(bias, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bias):
                raise ValueError("calibration bias must be null or a list of numbers")
            bias = tuple(float(b) for b in bias)
        return cls(float(temperature), bias)


IDENTITY = Calibration()


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in `x`'s dtype."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fit_calibration(
    logits,
    labels,
    method: CalibrationMethod = CalibrationMethod.BCTS,
    max_iter: int = 200,
    bias_l2: float = 1e-4,
) -> Calibration:
    """Fit a calibration on labelled held-out logits (N×K; tensor or array) by minimising the negative
    log-likelihood.

    Full-batch L-BFGS on log T (T stays positive) and, for BCTS, the per-class biases. `bias_l2` is a
    tiny ridge on the biases: a class missing from the held-out split would otherwise have its bias
    driven towards -inf, and the prior correction could never bring it back. Needs torch (imported
    here: fitting runs where models are trained, never in the serving process).
    """
    import torch
    import torch.nn.functional as F

    method = CalibrationMethod(method)
    if method is CalibrationMethod.NONE:
        return IDENTITY
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError("expected logits N×K and labels N")
    known = labels >= 0
    x, y = logits[known].detach().double().cpu(), labels[known].long().cpu()
    if y.numel() == 0:
        raise ValueError("calibration needs labelled samples")
    # Start L-BFGS from the best temperature on a log grid: from T=1 its line search stalls on a
    # strongly over-confident model (huge first gradient) and returns T=1 unchanged.
    grid = torch.logspace(-2, 3, 61, dtype=torch.float64)
    start = min(grid.tolist(), key=lambda t: float(F.cross_entropy(x / t, y)))
    log_t = torch.tensor(math.log(start), dtype=torch.float64, requires_grad=True)
    params = [log_t]
    bias = None
    if method is CalibrationMethod.BCTS:
        bias = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        params.append(bias)
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = x / log_t.exp()
        loss = F.cross_entropy(scaled if bias is None else scaled + bias, y)
        if bias is not None:
            loss = loss + bias_l2 * (bias * bias).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError("temperature scaling did not converge")
    if bias is None:
        return Calibration(temperature)
    b = bias.detach() - bias.detach().mean()  # softmax ignores a shared offset: store the centred one
    return Calibration(temperature, tuple(float(v) for v in b))


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The empirical class distribution of the labelled entries (label >= 0) of `labels` (float64)."""
    labels = np.asarray(labels)
    known = labels[labels >= 0].astype(np.int64)
    if known.size == 0:
        raise ValueError("no labelled samples")
    counts = np.bincount(known, minlength=num_classes).astype(np.float64)
    return counts / counts.sum()


def _check_prior(prior: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (num_classes,):
        raise ValueError(f"{name} has {tuple(prior.shape)} entries, expected ({num_classes},)")
    if not np.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero")
    return prior / prior.sum()


def em_prior(
    probs: np.ndarray,
    source_prior: np.ndarray,
    max_iter: int = 100,
    tol: float = 1e-6,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Saerens et al. (2002): EM re-estimate of the target class prior from unlabelled probabilities.

    `probs` (N×K) are calibrated p_s(y|x) under `source_prior` (K). Each step reweights every row by
    q/p, renormalises it, and takes the mean as the new q; it stops when no entry moves more than `tol`.
    `init` warm-starts q (e.g. the previous estimate of a sliding window). Returns q (K, float64).
    """
    x = np.asarray(probs, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("expected a non-empty N×K array of probabilities")
    p = _check_prior(source_prior, x.shape[1], "source_prior")
    if (p <= 0).any():
        raise ValueError("source_prior must be positive for every class")
    q = p.copy() if init is None else _check_prior(init, x.shape[1], "init")
    for _ in range(max_iter):
        post = x * (q / p)
        post = post / np.maximum(post.sum(1, keepdims=True), 1e-300)
        new = post.mean(0)
        done = float(np.abs(new - q).max()) < tol
        q = new
        if done:
            break
    return q


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts C[i, j] of predicted class i for true class j (labelled entries only), float64."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    known = labels >= 0
    index = predictions[known].astype(np.int64) * num_classes + labels[known].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).astype(np.float64).reshape(num_classes, num_classes)


def predicted_distribution(probs: np.ndarray) -> np.ndarray:
    """The share of each class among the argmax predictions of `probs` (N×K), float64."""
    probs = np.asarray(probs)
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1]).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def bbse_prior(confusion: np.ndarray, target_pred_dist: np.ndarray) -> np.ndarray:
    """Lipton et al. (2018), black-box shift estimation of the target class prior.

    `confusion` (K×K, [predicted, true]) holds counts or shares from labelled source data;
    `target_pred_dist` (K) is the share of each predicted class on the unlabelled target data. With
    P(ŷ|y) the column-normalised confusion, the target prior q solves P(ŷ|y) q = μ. A singular system
    (a class never seen or never predicted) is solved by least squares; the result is clipped to
    non-negative and renormalised.
    """
    c = np.asarray(confusion, dtype=np.float64)
    k = c.shape[0]
    if c.shape != (k, k):
        raise ValueError("confusion must be K×K")
    mu = _check_prior(target_pred_dist, k, "target_pred_dist")
    conditional = c / np.maximum(c.sum(0, keepdims=True), 1e-300)
    if int(np.linalg.matrix_rank(conditional)) == k:
        q = np.linalg.solve(conditional, mu)
    else:
        q = np.linalg.lstsq(conditional, mu, rcond=None)[0]
    q = np.maximum(q, 0.0)
    return q / q.sum() if q.sum() > 0 else mu


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    """Half the L1 distance between two distributions: how far an estimated prior moved from another (0..1)."""
    return 0.5 * float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).sum())


def floored(prior: np.ndarray, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """`prior` mixed with the uniform distribution so every class has at least `floor` (sums to 1)."""
    prior = np.asarray(prior, dtype=np.float64)
    prior = _check_prior(prior, prior.shape[-1], "prior")
    k = prior.shape[0]
    if not 0.0 <= floor * k < 1.0:
        raise ValueError(f"floor must be in [0, 1/{k})")
    return floor + (1.0 - k * floor) * prior


def correct(
    probs: np.ndarray, source_prior: np.ndarray, target_prior: np.ndarray, floor: float = DEFAULT_FLOOR
) -> np.ndarray:
    """Reweight p_s(y|x) (N×K) by q(y)/p(y) and renormalise each row: p_t(y|x) under the target prior.

    The target prior is floored first (`floored`): no class is ever driven to zero, so one that
    returns to the traffic can still be predicted. Returns rows in `probs`' float dtype.
    """
    probs = np.asarray(probs)
    probs = probs if probs.dtype in (np.float32, np.float64) else probs.astype(np.float64)
    k = probs.shape[-1]
    p = _check_prior(source_prior, k, "source_prior")
    if (p <= 0).any():
        raise ValueError("source_prior must be positive for every class")
    w = (floored(_check_prior(target_prior, k, "target_prior"), floor) / p).astype(probs.dtype)
    out = probs * w
    return out / np.maximum(out.sum(-1, keepdims=True), np.finfo(probs.dtype).tiny)


class PriorTracker:
    """The EM prior over a sliding window of the last `window` calibrated probability vectors of traffic.

    `add` is O(1) per sample; `estimate` runs EM over the window (warm-started from the last estimate,
    recomputed only when samples arrived since), so calling it every few samples is cheap.
    """

    def __init__(
        self,
        source_prior: np.ndarray,
        window: int = 1024,
        min_samples: int = 64,
        max_iter: int = 100,
        tol: float = 1e-6,
    ) -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError("need window >= 1 and 1 <= min_samples <= window")
        self.source_prior = _check_prior(source_prior, len(source_prior), "source_prior")
        self.window, self.min_samples, self.max_iter, self.tol = window, min_samples, max_iter, tol
        self._rows: Deque[np.ndarray] = deque(maxlen=window)
        self._seen = 0  # samples ever added
        self._estimate: np.ndarray | None = None
        self._estimated_at = -1  # `_seen` when `_estimate` was computed

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seen(self) -> int:
        """Samples added since the tracker was made (the window holds the last `window` of them)."""
        return self._seen

    def add(self, probs: np.ndarray) -> None:
        """Append one probability vector (K) or a batch of them (N×K)."""
        rows = np.asarray(probs, dtype=np.float64)
        rows = rows[None] if rows.ndim == 1 else rows
        if rows.ndim != 2 or rows.shape[1] != self.source_prior.shape[0]:
            raise ValueError(f"expected probabilities over {self.source_prior.shape[0]} classes")
        for row in rows:
            self._rows.append(row)
        self._seen += rows.shape[0]

    def estimate(self) -> np.ndarray | None:
        """The EM target prior over the window; None until it holds `min_samples`."""
        if len(self._rows) < self.min_samples:
            return None
        if self._estimated_at != self._seen:
            self._estimate = em_prior(
                np.stack(self._rows), self.source_prior, self.max_iter, self.tol, init=self._warm_start()
            )
            self._estimated_at = self._seen
        return self._estimate

    def _warm_start(self) -> np.ndarray | None:
        # Mixed with the source prior so a class the last estimate drove to ~0 can come back within a few steps.
        if self._estimate is None:
            return None
        return 0.5 * self._estimate + 0.5 * self.source_prior

    def probabilities(self) -> np.ndarray:
        """The window's probability vectors (N×K, float64; N may be 0)."""
        if not self._rows:
            return np.zeros((0, self.source_prior.shape[0]), dtype=np.float64)
        return np.stack(self._rows)

    def reset(self) -> None:
        """Forget the window (e.g. after the served model changed, whose probabilities it held)."""
        self._rows.clear()
        self._estimate, self._estimated_at = None, -1


__all__ = [
    "DEFAULT_FLOOR", "CalibrationMethod", "Calibration", "IDENTITY", "softmax", "fit_calibration", "class_prior", "em_prior",
    "confusion_matrix", "predicted_distribution", "bbse_prior", "total_variation", "floored", "correct", "PriorTracker",
]
