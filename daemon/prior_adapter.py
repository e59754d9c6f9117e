"""Serve under the device's class prior: no training, no labels.

Every answered image's calibrated probabilities feed a sliding-window EM estimate of the traffic's class
prior (prune_core.label_shift); answers are reweighted to it (floored, so no class is ever driven to
zero). Labelled requests are spot checks: where the corrected answers score below the uncorrected ones
over the recent spot checks, correction is switched off until they no longer do. numpy only: the
serving process imports no torch.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Deque

import numpy as np

from prune_core.card import ModelCard
from prune_core.label_shift import PriorTracker, bbse_prior, correct, predicted_distribution, total_variation


@dataclass(frozen=True)
class PriorSettings:
    enabled: bool = True  # correct answers to the estimated prior (estimation runs either way)
    floor: float = 1e-3  # the smallest prior share a class is given when correcting
    gate: float = 0.2  # correct only when the estimate is at least this far (total variation) from the model's prior
    window: int = 1024  # traffic samples the estimate is made over
    min_samples: int = 64  # no correction before this many samples
    spot_window: int = 200  # labelled requests the spot check looks back over
    spot_min: int = 20  # labelled requests before the spot check can switch correction off

    @classmethod
    def from_settings(cls, settings) -> "PriorSettings":
        """From the daemon's Settings (prior_* fields)."""
        window = settings.prior_window
        return cls(settings.prior_adaptation, settings.prior_floor, settings.prior_gate, window, min(settings.prior_min_samples, window))


@dataclass
class SpotCheck:
    """Labelled requests: how many the uncorrected and the corrected answer got right."""

    labelled: int = 0
    correct_raw: int = 0
    correct_corrected: int = 0


@dataclass
class PriorView:
    """What /status, /metrics and the status page show."""

    enabled: bool
    applied: bool  # answers are being corrected now
    reason: str  # why not, when not applied
    samples: int  # in the window
    classes: list[str]
    source_prior: list[float]  # what the served model's probabilities assume
    estimate: list[float] | None  # EM over the window
    bbse: list[float] | None  # black-box shift estimate, where the model's card has a confusion matrix
    spot_check: SpotCheck = field(default_factory=SpotCheck)

    def to_dict(self) -> dict:
        named = lambda v: None if v is None else dict(zip(self.classes, v))  # noqa: E731
        return {
            "enabled": self.enabled, "applied": self.applied, "reason": self.reason, "samples": self.samples,
            "source_prior": named(self.source_prior), "estimate": named(self.estimate), "bbse": named(self.bbse),
            "spot_check": self.spot_check.__dict__.copy(),
        }


class PriorAdapter:
    """Per served model: calibrate, track the prior, correct. Thread-safe (requests run in a pool)."""

    def __init__(self, card: ModelCard, settings: PriorSettings = PriorSettings()):
        self.s = settings
        self.card = card
        self.calibration = card.calibration()
        self.source = np.asarray(card.prior(), dtype=np.float64)
        self.tracker = PriorTracker(self.source, window=settings.window, min_samples=settings.min_samples)
        self._lock = threading.Lock()
        self._estimate: np.ndarray | None = None
        self._bbse: list[float] | None = None
        self._refreshed_at = 0  # tracker.seen at the last refresh
        self._spots: Deque[tuple[bool, bool]] = deque(maxlen=settings.spot_window)

    def answer(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(served probabilities, uncorrected calibrated probabilities), float32 N×K, for a batch of
        logits (N×K). The request path only records the answer; `refresh` (the scheduler's poll)
        re-estimates."""
        probs = self.calibration.apply(np.asarray(logits, dtype=np.float32))
        with self._lock:
            self.tracker.add(probs)
            estimate, applied = self._estimate, self._applied()
        if not applied or estimate is None:
            return probs, probs
        return correct(probs, self.source, estimate, self.s.floor), probs

    def refresh(self) -> None:
        """Re-estimate the prior (EM, and BBSE where the card allows) from the answers recorded since
        the last refresh; called off the request path, by the scheduler at every poll."""
        with self._lock:
            if self.tracker.seen == self._refreshed_at:
                return
            self._refreshed_at = self.tracker.seen
            self._estimate = self.tracker.estimate()
            self._bbse = self._bbse_estimate()

    def spot_check(self, raw_pred: int, served_pred: int, label: int) -> None:
        """Record a labelled request: was the uncorrected / the corrected answer right?"""
        with self._lock:
            self._spots.append((raw_pred == label, served_pred == label))

    def _applied(self) -> bool:
        return self.s.enabled and self._shifted() and not self._spot_check_fails()

    def _shifted(self) -> bool:
        """An estimate exists and has moved past the gate: without a shift, EM's noise only costs."""
        return self._estimate is not None and total_variation(self._estimate, self.source) >= self.s.gate

    def _spot_check_fails(self) -> bool:
        if len(self._spots) < self.s.spot_min:
            return False
        raw = sum(r for r, _ in self._spots)
        corrected = sum(c for _, c in self._spots)
        return corrected < raw

    def target(self) -> list[float] | None:
        """The prior a cycle's teacher should be corrected to: the estimate while answers are being
        corrected to it, else None (no shift, correction off, or the spot check against it)."""
        with self._lock:
            return [float(v) for v in self._estimate] if self._applied() else None

    def view(self) -> PriorView:
        with self._lock:
            estimate = None if self._estimate is None else [float(v) for v in self._estimate]
            spots = SpotCheck(len(self._spots), sum(r for r, _ in self._spots), sum(c for _, c in self._spots))
            applied = self._applied()
            if applied:
                reason = ""
            elif not self.s.enabled:
                reason = "prior_adaptation is off"
            elif estimate is None:
                reason = f"estimating: {len(self.tracker)} of {self.s.min_samples} samples"
            elif not self._shifted():
                reason = (f"no shift: the estimate is {total_variation(self._estimate, self.source):.2f} from the model's prior"
                          f" (total variation; correction from {self.s.gate:g})")
            else:
                reason = "the corrected answers scored below the uncorrected ones on recent labelled requests"
            bbse = self._bbse
        return PriorView(
            self.s.enabled, applied, reason, len(self.tracker), list(self.card.class_names),
            [float(v) for v in self.source], estimate, bbse, spots,
        )

    def _bbse_estimate(self) -> list[float] | None:
        if not self.card.confusion or len(self.tracker) < self.s.min_samples:
            return None
        rows = self.tracker.probabilities()
        return [float(v) for v in bbse_prior(np.asarray(self.card.confusion), predicted_distribution(rows))]
