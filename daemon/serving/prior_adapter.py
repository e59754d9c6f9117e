"""Serve under the device's class prior: no training, no labels, never worse than the model as deployed.

One `PriorAdapter` per device (the runtime's), shared by every served model: the traffic's class prior
belongs to the camera, not to a model, so it survives swaps, engine rebuilds and (replayed from the
buffer) restarts. Each answered image is kept as a likelihood row (its calibrated probabilities divided
by its model's class prior: prune_core.online_prior), so the estimate carries over to a new model
through that model's own calibration. The request path only records; `refresh` (the scheduler's poll)
runs change detection on the predicted-class shares, EM over the current scene and the rule deciding
whether correcting pays (expected gain, prequential evidence, and labelled spot checks of both the
uncorrected and the corrected answer, whichever was served). numpy only: no torch when serving.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from prune_core.card import ModelCard
from prune_core.label_shift import Calibration, bbse_prior, correct
from prune_core.online_prior import OnlineCorrector, SafetySettings, likelihood_rows


@dataclass(frozen=True)
class PriorSettings:
    enabled: bool = True  # correct answers to the estimated prior (estimation runs either way)
    floor: float = 1e-3  # the smallest prior share a class is given when correcting
    gate: float = 0.2  # correct only when the estimate is at least this far (total variation) from the model's prior
    window: int = 1024  # at most this many answers of the current scene are estimated over
    min_samples: int = 24  # answers of a scene before it has an estimate
    spot_window: int = 200  # labelled requests the spot check looks back over
    min_gain: float = 0.01  # correct only where the expected accuracy gain is at least this
    change_z: float = 4.5  # the change detector's false-alarm level (a normal quantile; higher: fewer, later)

    @classmethod
    def from_settings(cls, settings) -> "PriorSettings":
        """From the daemon's Settings (prior_* fields)."""
        window = settings.prior_window
        return cls(settings.prior_adaptation, settings.prior_floor, settings.prior_gate, window,
                   min(settings.prior_min_samples, window), min_gain=settings.prior_min_gain, change_z=settings.prior_change_z)


@dataclass(frozen=True)
class ModelPrior:
    """What one served model's probabilities assume: its calibration and the class prior it was trained for."""

    version: str
    calibration: Calibration
    source: np.ndarray
    class_names: tuple[str, ...]
    confusion: tuple[tuple[float, ...], ...] = ()

    @classmethod
    def of(cls, version: str, card: ModelCard) -> "ModelPrior":
        return cls(version, card.calibration(), np.asarray(card.prior(), dtype=np.float64), tuple(card.class_names),
                   tuple(tuple(r) for r in card.confusion))


@dataclass(frozen=True)
class Answers:
    """A batch answered: served (corrected where that is on) and uncorrected calibrated probabilities
    (float32 N×K), the argmax under the estimate in force (None without one) and the likelihood rows."""

    served: np.ndarray
    raw: np.ndarray
    corrected_pred: np.ndarray | None
    rows: np.ndarray


@dataclass
class SpotCheck:
    """Labelled requests of the current scene: how many the uncorrected and the corrected answer got right
    (both counterfactual answers, whichever was served)."""

    labelled: int = 0
    correct_raw: int = 0
    correct_corrected: int = 0


@dataclass
class PriorView:
    """What /status, /metrics and the status page show."""

    enabled: bool
    applied: bool  # answers are being corrected now
    reason: str  # why, or why not
    samples: int  # answers the estimate is made over (the current scene)
    classes: list[str]
    source_prior: list[float]  # what the served model's probabilities assume
    estimate: list[float] | None  # EM over the current scene
    bbse: list[float] | None  # black-box shift estimate, where the model's card has a confusion matrix
    expected_gain: float | None = None  # accuracy correcting is expected to gain, under the estimate
    evidence: float | None = None  # log Bayes factor of the latest answers for the estimate over the model's prior
    changes: int = 0  # scene changes detected since the daemon started
    last_change: dict | None = None  # {"answers_ago", "scale", "seconds_ago"} of the last one
    spot_check: SpotCheck = field(default_factory=SpotCheck)

    def to_dict(self) -> dict:
        named = lambda v: None if v is None else dict(zip(self.classes, v))  # noqa: E731
        return {
            "enabled": self.enabled, "applied": self.applied, "reason": self.reason, "samples": self.samples,
            "source_prior": named(self.source_prior), "estimate": named(self.estimate), "bbse": named(self.bbse),
            "expected_gain": self.expected_gain, "evidence": self.evidence, "changes": self.changes,
            "last_change": self.last_change, "spot_check": self.spot_check.__dict__.copy(),
        }


class PriorAdapter:
    """The device's class prior: record answers, refresh off the request path, correct. Thread-safe."""

    def __init__(self, settings: PriorSettings = PriorSettings()):
        self.s = settings
        self._lock = threading.Lock()
        self._corrector: OnlineCorrector | None = None  # made for the first model's class count
        self._last_version: str | None = None  # the model that answered last
        self._decided_for: str | None = None  # the model the last decision was made for
        self._change_time: float | None = None
        self._changes_seen = 0

    def _ensure(self, k: int) -> OnlineCorrector:
        if self._corrector is None or self._corrector.k != k:  # a model of other classes: start over
            self._corrector = OnlineCorrector(
                k, self.s.window, self.s.min_samples, self.s.floor,
                SafetySettings(gate=self.s.gate, min_gain=self.s.min_gain), self.s.spot_window, self.s.change_z)
        return self._corrector

    def answer(self, model: ModelPrior, logits: np.ndarray) -> Answers:
        """Calibrate a batch of logits (N×K) under `model`, record it as traffic and answer it (corrected
        when the last refresh said correcting pays)."""
        raw = model.calibration.apply(np.asarray(logits, dtype=np.float32))
        rows = likelihood_rows(raw, model.source)
        with self._lock:
            corrector = self._ensure(raw.shape[1])
            new_model = self._last_version is not None and self._last_version != model.version
            self._last_version = model.version
            corrector.record(rows, raw.argmax(1), model.source, new_model)
            if self._decided_for != model.version:  # just swapped in: decide for its prior now, not at the next poll
                corrector.redecide(model.source)
                self._decided_for = model.version
            state = corrector.state
        if state.estimate is None:
            return Answers(raw, raw, None, rows.astype(np.float32))
        corrected = correct(raw, model.source, state.estimate, self.s.floor)
        served = corrected if self.s.enabled and state.applied else raw
        return Answers(served, raw, corrected.argmax(1), rows.astype(np.float32))

    def refresh(self, model: ModelPrior) -> None:
        """Take in the answers recorded since the last refresh and decide again (the scheduler's poll)."""
        with self._lock:
            corrector = self._ensure(len(model.source))
            state = corrector.refresh(model.source)
            self._decided_for = model.version
            if state.changes != self._changes_seen:
                self._changes_seen, self._change_time = state.changes, time.time()

    def new_scene(self) -> None:
        """Forget the current scene's estimate: the generalist is served again because classes the specialist
        was not trained for appeared, so what the specialist's answers said about this scene is not trusted."""
        with self._lock:
            if self._corrector is not None:
                self._corrector.new_scene()
                self._changes_seen, self._change_time = self._corrector.state.changes, time.time()

    def spot_check(self, raw_pred: int, corrected_pred: int | None, label: int) -> None:
        """A labelled request: the uncorrected and the corrected answer (None without an estimate)."""
        with self._lock:
            if self._corrector is not None:
                self._corrector.spot_check(raw_pred, corrected_pred, label)

    def replay(self, model: ModelPrior, rows: np.ndarray, raw_preds: np.ndarray, labels: list[int | None], every: int = 16) -> None:
        """Rebuild the state from stored answers (the buffer's latest, oldest first) at start, refreshing every
        `every` of them as the scheduler would; labelled ones are spot checks under the estimate then in force."""
        with self._lock:
            corrector = self._ensure(len(model.source))
            for lo in range(0, len(rows), every):
                hi = min(lo + every, len(rows))
                post = corrector.correct(rows[lo:hi])
                for i in range(lo, hi):
                    if labels[i] is not None:
                        corrector.spot_check(int(raw_preds[i]), None if post is None else int(post[i - lo].argmax()), int(labels[i]))
                corrector.record(rows[lo:hi], raw_preds[lo:hi], model.source)
                corrector.refresh(model.source)
            self._changes_seen = corrector.state.changes
            self._last_version = self._decided_for = model.version

    def target(self) -> list[float] | None:
        """Whether a cycle's teacher should be corrected: the estimate while answers are corrected to it, else
        None. (The worker re-estimates the prior of the samples it trains on, starting from this.)"""
        with self._lock:
            state = None if self._corrector is None else self._corrector.state
            if state is None or not (self.s.enabled and state.applied):
                return None
            return [float(v) for v in state.estimate]

    def view(self, model: ModelPrior) -> PriorView:
        with self._lock:
            corrector = self._ensure(len(model.source))
            state = corrector.state
            estimate = None if state.estimate is None else [float(v) for v in state.estimate]
            spots = SpotCheck(*corrector.spot_totals())
            reason = "prior_adaptation is off" if not self.s.enabled else state.reason
            last = None
            if state.last_change is not None:
                last = {"answers_ago": corrector.tracker.seen - state.last_change.at, "scale": state.last_change.scale,
                        "seconds_ago": None if self._change_time is None else round(time.time() - self._change_time, 1)}
            bbse = None
            if model.confusion and state.estimate is not None:
                _, preds = corrector.tracker.scene()
                counts = np.bincount(preds, minlength=len(model.source)).astype(np.float64)
                bbse = [float(v) for v in bbse_prior(np.asarray(model.confusion), counts / max(counts.sum(), 1.0))]
            return PriorView(
                self.s.enabled, self.s.enabled and state.applied, reason, state.scene, list(model.class_names),
                [float(v) for v in model.source], estimate, bbse, state.gain, state.evidence, state.changes, last, spots)
