"""Online label shift: follow the class prior of traffic that changes, and know when correcting to it pays.

Everything here is numpy and works on *likelihood rows*: a calibrated probability vector divided by the
class prior of the model that produced it and renormalised (∝ p(x|y)). A row means the same whatever
model answered, so an estimate kept over such rows survives a model swap; correcting a row to a prior q
is `normalise(row · q)`, its uncorrected posterior is `normalise(row · source)`.

Estimators:

- `SceneTracker` (this project's): EM (Saerens et al. 2002) over the traffic since the last change the
  `ShareDetector` found in the predicted-class shares, capped at `window` rows: on steady traffic it is
  the sliding-window EM, after an abrupt change it restarts on the new scene within tens of images.
- `FollowTheHistory` (Wu et al., NeurIPS 2021, FTH): the mean of every round's unbiased estimate.
- `FlhFtl` (Baby et al., NeurIPS 2023, FLH-FTL): follow-the-leading-history over experts that each
  average the round estimates since their start, weighted by exponential weights on the squared error.

The two published ones take per-round BBSE estimates (Lipton et al. 2018) from a labelled source
confusion matrix, as in their papers (`update(preds)` once per round). `decide` is the rule that says
whether correcting pays, and `OnlineCorrector` puts the scene tracker, the evidence and the labelled
spot checks together for the daemon (daemon/serving/prior_adapter.py) and the bench (bench/online_shift.py).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Deque

import numpy as np

from .label_shift import bbse_prior, em_prior, floored


def likelihood_rows(probs: np.ndarray, source_prior: np.ndarray) -> np.ndarray:
    """Calibrated probabilities (N×K) under `source_prior` → rows ∝ p(x|y), each summing to 1 (float64)."""
    x = np.asarray(probs, dtype=np.float64)
    x = x[None] if x.ndim == 1 else x
    p = np.asarray(source_prior, dtype=np.float64)
    if (p <= 0).any():
        raise ValueError("source_prior must be positive for every class")
    rows = x / p
    return rows / np.maximum(rows.sum(1, keepdims=True), 1e-300)


def posterior(rows: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The posteriors p(y|x) of likelihood rows (N×K) under `prior` (K)."""
    out = np.asarray(rows, dtype=np.float64) * np.asarray(prior, dtype=np.float64)
    return out / np.maximum(out.sum(1, keepdims=True), 1e-300)


def expected_gain(rows: np.ndarray, raw_preds: np.ndarray, prior: np.ndarray) -> float:
    """Label-free: the accuracy the answers corrected to `prior` are expected to gain over the uncorrected
    ones (`raw_preds`), if `prior` is the traffic's (mean of max_y p(y|x) − p(ŷ_raw|x) under it)."""
    if len(rows) == 0:
        return 0.0
    post = posterior(rows, prior)
    return float((post.max(1) - post[np.arange(len(post)), np.asarray(raw_preds)]).mean())


def log_evidence(rows: np.ndarray, prior: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Per row, log p(x | prior) − log p(x | source): how much better `prior` explains each image than the
    prior its model assumes. Scored on rows that arrived after `prior` was estimated (prequentially) it
    is an unbiased, label-free test of the estimate: negative when the scene moved away from it."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.log(np.maximum(rows @ np.asarray(prior, dtype=np.float64), 1e-300)) - np.log(
        np.maximum(rows @ np.asarray(source, dtype=np.float64), 1e-300))


def chi2_quantile(df: int, z: float) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile with `df` degrees of freedom at the normal
    quantile `z` (numpy only: no scipy in the serving process)."""
    df = max(int(df), 1)
    a = 2.0 / (9.0 * df)
    return df * max(1.0 - a + z * math.sqrt(a), 0.0) ** 3


def g_statistic(recent: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """The two-sample likelihood-ratio (G) statistic of two count vectors and its degrees of freedom
    (classes seen in either sample, minus one)."""
    table = np.stack([recent, reference]).astype(np.float64)
    cols = table.sum(0)
    seen = cols > 0
    table, cols = table[:, seen], cols[seen]
    expected = table.sum(1, keepdims=True) * cols / max(cols.sum(), 1.0)
    nz = table > 0
    g = 2.0 * float((table[nz] * np.log(table[nz] / expected[nz])).sum())
    return g, max(int(seen.sum()) - 1, 1)


@dataclass(frozen=True)
class Change:
    """A change the detector found: `at` is the position in the stream (rows added before it), `scale`
    how many recent predictions differed from the reference, `statistic` G over its threshold."""

    at: int
    scale: int
    statistic: float


class ShareDetector:
    """Change detection on the shares of predicted classes (argmax): at each `test`, the last m
    predictions (m on a geometric grid) are compared with the rest of the current scene by a G test at
    a false-alarm level set by `z`; the split with the largest excess starts a new scene. Like ADWIN, but
    on a K-class multinomial. O(K · scales) per test."""

    SCALES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)

    def __init__(self, num_classes: int, window: int = 1024, z: float = 4.5, min_reference: int = 16):
        self.k, self.window, self.z, self.min_reference = num_classes, window, z, min_reference
        self._preds: Deque[int] = deque(maxlen=window)
        self.seen = 0

    def __len__(self) -> int:
        return len(self._preds)

    def add(self, preds) -> None:
        for p in np.atleast_1d(np.asarray(preds, dtype=np.int64)).tolist():
            self._preds.append(int(p))
        self.seen += int(np.atleast_1d(preds).shape[0])

    def test(self) -> Change | None:
        """Look for a change; on one, the scene restarts at it (the older predictions are forgotten)."""
        n = len(self._preds)
        if n < self.SCALES[0] + self.min_reference:
            return None
        preds = np.fromiter(self._preds, dtype=np.int64, count=n)
        best: tuple[float, int, float] | None = None
        for m in self.SCALES:
            if m > n - self.min_reference:
                break
            g, df = g_statistic(np.bincount(preds[n - m:], minlength=self.k), np.bincount(preds[:n - m], minlength=self.k))
            excess = g / chi2_quantile(df, self.z)
            if excess > 1.0 and (best is None or excess > best[0]):
                best = (excess, m, g)
        if best is None:
            return None
        _, m, g = best
        self.restart(keep=m)
        return Change(self.seen - m, m, g)

    def restart(self, keep: int = 0) -> None:
        """Forget all but the last `keep` predictions (a new scene, or a new model whose argmax differs)."""
        kept = list(self._preds)[len(self._preds) - keep:] if keep else []
        self._preds.clear()
        self._preds.extend(kept)


class SceneTracker:
    """EM over the rows since the last detected change (at most `window`): the prior of the current scene.

    `add` is O(1) per row (record only); `refresh` runs the detector and EM, off the request path."""

    def __init__(self, num_classes: int, window: int = 1024, min_samples: int = 24, z: float = 4.5,
                 max_iter: int = 100, tol: float = 1e-6):
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError("need window >= 1 and 1 <= min_samples <= window")
        self.k, self.window, self.min_samples, self.max_iter, self.tol = num_classes, window, min_samples, max_iter, tol
        self.detector = ShareDetector(num_classes, window, z)
        self._rows: Deque[np.ndarray] = deque(maxlen=window)
        self._preds: Deque[int] = deque(maxlen=window)
        self._segment = 0  # rows of the current scene among `_rows`
        self.seen = 0
        self.last_change: Change | None = None
        self.changes = 0
        self._estimate: np.ndarray | None = None

    def add(self, rows: np.ndarray, preds) -> None:
        """Likelihood rows (N×K) and the served model's uncorrected argmax of each."""
        rows = np.asarray(rows, dtype=np.float64)
        rows = rows[None] if rows.ndim == 1 else rows
        if rows.ndim != 2 or rows.shape[1] != self.k:
            raise ValueError(f"expected likelihood rows over {self.k} classes")
        preds = np.atleast_1d(np.asarray(preds, dtype=np.int64))
        for row, pred in zip(rows, preds.tolist()):
            self._rows.append(row)
            self._preds.append(pred)
        self._segment = min(self._segment + len(rows), len(self._rows))
        self.seen += len(rows)
        self.detector.add(preds)

    @property
    def segment(self) -> int:
        """Rows of the current scene held (what the estimate is made over)."""
        return self._segment

    def scene(self) -> tuple[np.ndarray, np.ndarray]:
        """The current scene's rows (N×K) and uncorrected predictions (N)."""
        n = self._segment
        if n == 0:
            return np.zeros((0, self.k)), np.zeros(0, dtype=np.int64)
        rows = list(self._rows)[-n:]
        preds = list(self._preds)[-n:]
        return np.stack(rows), np.asarray(preds, dtype=np.int64)

    def refresh(self) -> Change | None:
        """Test for a change (a new scene starts at it), then re-estimate; returns the change, if any."""
        change = self.detector.test()
        if change is not None:
            self._segment = min(change.scale, len(self._rows))
            self.last_change, self.changes = change, self.changes + 1
            self._estimate = None
        if self._segment < self.min_samples:
            self._estimate = None
            return change
        rows, _ = self.scene()
        init = None if self._estimate is None else 0.5 * self._estimate + 0.5 / self.k
        self._estimate = em_prior(rows, np.full(self.k, 1.0 / self.k), self.max_iter, self.tol, init=init)
        return change

    def estimate(self) -> np.ndarray | None:
        return self._estimate

    def new_scene(self) -> None:
        """Start a new scene now (told from outside, e.g. the traffic holds classes the last model could not see)."""
        self._segment, self._estimate = 0, None
        self.last_change, self.changes = Change(self.seen, 0, 0.0), self.changes + 1
        self.detector.restart()

    def model_changed(self) -> None:
        """A new model answers from now on: its argmax shares differ from the old one's even on the same
        scene, so the detector starts afresh; the rows (model-free) and the estimate are kept."""
        self.detector.restart()


class FollowTheHistory:
    """Wu et al. (2021), FTH: the prior for the next round is the mean of all rounds' estimates so far."""

    def __init__(self, source_prior: np.ndarray, confusion: np.ndarray):
        self.source, self.confusion = np.asarray(source_prior, dtype=np.float64), np.asarray(confusion, dtype=np.float64)
        self._sum = np.zeros_like(self.source)
        self.rounds = 0

    def round_estimate(self, preds: np.ndarray) -> np.ndarray:
        """BBSE on one round's predictions: an unbiased (if noisy) estimate of that round's prior."""
        counts = np.bincount(np.asarray(preds, dtype=np.int64), minlength=len(self.source)).astype(np.float64)
        return bbse_prior(self.confusion, counts / max(counts.sum(), 1.0))

    def update(self, preds: np.ndarray) -> None:
        """One round: the uncorrected predictions of the images that arrived in it."""
        if len(preds):
            self._sum += self.round_estimate(preds)
            self.rounds += 1

    def estimate(self) -> np.ndarray | None:
        return None if self.rounds == 0 else self._sum / self.rounds


class FlhFtl(FollowTheHistory):
    """Baby et al. (2023), FLH-FTL: one expert per start round, each the mean of the round estimates since
    its start (follow-the-leader); the experts are mixed by exponential weights on the squared error of
    each round's estimate (rate 1/K, as in acmi-lab/OnlineLabelShift), a new expert entering with 1/t."""

    def __init__(self, source_prior: np.ndarray, confusion: np.ndarray, rate: float | None = None, max_experts: int = 4096):
        super().__init__(source_prior, confusion)
        self.rate = 1.0 / len(self.source) if rate is None else rate
        self.max_experts = max_experts
        self._history: list[np.ndarray] = []
        self._weights = np.zeros(0)

    def _experts(self) -> np.ndarray:
        """E×K: expert j averages the last j+1 round estimates."""
        h = np.asarray(self._history[::-1])  # newest first
        return np.cumsum(h, 0) / np.arange(1, len(h) + 1)[:, None]

    def update(self, preds: np.ndarray) -> None:
        if not len(preds):
            return
        s = self.round_estimate(preds)
        if self._history:
            experts = self._experts()
            self._weights = self._weights * np.exp(-self.rate * ((experts - s) ** 2).sum(1))
            self._weights = self._weights / max(self._weights.sum(), 1e-300)
            t = len(self._history)
            self._weights = np.concatenate([[1.0 / (t + 1)], self._weights * t / (t + 1)])  # the new expert is the newest
        else:
            self._weights = np.ones(1)
        self._history.append(s)
        if len(self._history) > self.max_experts:
            self._history.pop(0)
            self._weights = self._weights[:-1] / self._weights[:-1].sum()
        self.rounds += 1

    def estimate(self) -> np.ndarray | None:
        if not self._history:
            return None
        q = self._weights @ self._experts()
        return q / q.sum()


@dataclass(frozen=True)
class SafetySettings:
    """When correcting pays. Label-free: the estimate must move at least `gate` (total variation) from the
    served model's prior, be expected to gain at least `min_gain` accuracy under itself, and the last
    `evidence_window` images that arrived after it was made must not be `evidence_odds` times likelier under
    the model's own prior than under it (a prequential Bayes factor: after an abrupt change a handful of new
    images suffice). Labelled spot checks overrule both ways once the answers they saw differ significantly
    (a sign test on the requests where raw and corrected disagree, at `z`)."""

    gate: float = 0.2
    min_gain: float = 0.01
    evidence_window: int = 16
    evidence_odds: float = 20.0
    z: float = 2.0


@dataclass(frozen=True)
class Verdict:
    applied: bool
    reason: str  # why (applied or not), in words


def spot_verdict(raw_only: int, corrected_only: int, z: float) -> int:
    """The sign test on the labelled requests where exactly one of the two answers was right: +1 when the
    corrected answers are significantly better, -1 when significantly worse, 0 otherwise."""
    n = raw_only + corrected_only
    if n == 0:
        return 0
    stat = (corrected_only - raw_only) / math.sqrt(n)
    return 1 if stat > z else -1 if stat < -z else 0


def decide(s: SafetySettings, shift: float, gain: float, evidence: float | None, spots: tuple[int, int]) -> Verdict:
    """Correct or not: `shift` the total variation of the estimate from the served model's prior, `gain` the
    expected accuracy gain, `evidence` the prequential log Bayes factor of the recent images for the estimate
    (None while none arrived after it), `spots` (raw only right, corrected only right) on labelled requests."""
    labels = spot_verdict(spots[0], spots[1], s.z)
    if labels:
        better, worse = ("corrected", "uncorrected") if labels > 0 else ("uncorrected", "corrected")
        counts = (spots[1], spots[0]) if labels > 0 else spots
        return Verdict(labels > 0, f"labelled requests: the {better} answers were right {counts[0]} times where the {worse}"
                                   f" were not, against {counts[1]}")
    if shift < s.gate:
        return Verdict(False, f"no shift: the estimate is {shift:.2f} from the model's prior (total variation; correction from {s.gate:g})")
    if gain < s.min_gain:
        return Verdict(False, f"not worth it: correcting is expected to gain {100 * gain:.1f} points (from {100 * s.min_gain:g})")
    if evidence is not None and evidence < -math.log(s.evidence_odds):
        return Verdict(False, "the estimate explains the latest images worse than the model's own prior (the scene may be changing)")
    return Verdict(True, f"correcting: expected to gain {100 * gain:.1f} points")


@dataclass(frozen=True)
class OnlineState:
    """What the corrector decided at its last refresh (read by the request path, shown by /status)."""

    estimate: np.ndarray | None
    applied: bool
    reason: str
    gain: float | None  # expected accuracy gain of correcting, under the estimate
    evidence: float | None  # prequential log Bayes factor of the latest images for the estimate over the model's prior
    scene: int  # rows the estimate is made over
    last_change: Change | None
    changes: int


class OnlineCorrector:
    """The scene tracker, the prequential evidence and the labelled spot checks, and the decision whether
    to correct. `record` and `spot_check` are the request path (they only append); `refresh` does the work.

    Not thread-safe: the daemon's adapter holds a lock around it."""

    def __init__(self, num_classes: int, window: int = 1024, min_samples: int = 24, floor: float = 1e-3,
                 safety: SafetySettings = SafetySettings(), spot_window: int = 200, z: float = 4.5, gain_window: int = 256):
        self.k, self.floor, self.safety, self.gain_window = num_classes, floor, safety, gain_window
        self.tracker = SceneTracker(num_classes, window, min_samples, z)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []  # rows, raw preds, row·source, new model
        self._evidence: Deque[float] = deque(maxlen=safety.evidence_window)
        self._spots: Deque[tuple[bool, bool]] = deque(maxlen=spot_window)
        self._source: np.ndarray = np.full(num_classes, 1.0 / num_classes)
        self._spotted = False  # spot checks arrived since the last decision
        self.state = OnlineState(None, False, f"estimating: 0 of {min_samples} samples", None, None, 0, None, 0)

    def record(self, rows: np.ndarray, raw_preds, source: np.ndarray, new_model: bool = False) -> None:
        """Answered images: likelihood rows, the uncorrected argmax, and the prior of the model that answered
        (`new_model` when it is not the one that answered the previous images)."""
        rows = np.asarray(rows, dtype=np.float64)
        rows = rows[None] if rows.ndim == 1 else rows
        self._pending.append((rows, np.atleast_1d(np.asarray(raw_preds, dtype=np.int64)), rows @ np.asarray(source, dtype=np.float64), new_model))

    def spot_check(self, raw_pred: int, corrected_pred: int | None, label: int) -> None:
        """A labelled request: were the uncorrected and the corrected answer (under the estimate in force,
        whichever was served) right? Without an estimate there is nothing to compare."""
        if corrected_pred is not None:
            self._spots.append((raw_pred == label, corrected_pred == label))
            self._spotted = True

    def spots(self) -> tuple[int, int, int]:
        """(labelled requests, only the uncorrected right, only the corrected right) since the scene began."""
        raw_only = sum(r and not c for r, c in self._spots)
        corrected_only = sum(c and not r for r, c in self._spots)
        return len(self._spots), raw_only, corrected_only

    def spot_totals(self) -> tuple[int, int, int]:
        """(labelled requests, uncorrected right, corrected right) since the scene began."""
        return len(self._spots), sum(r for r, _ in self._spots), sum(c for _, c in self._spots)

    @property
    def pending(self) -> int:
        return sum(len(r) for r, _, _, _ in self._pending)

    def refresh(self, served_source: np.ndarray) -> OnlineState:
        """Take in the recorded images (scoring each against the estimate in force when it arrived), look for a
        change, re-estimate and decide. `served_source`: the prior the served model assumes."""
        pending, self._pending = self._pending, []
        if not pending:  # no new image (an idle camera): no need to test or estimate again
            changed, self._spotted = self._spotted or not np.array_equal(served_source, self._source), False
            return self.redecide(served_source) if changed else self.state
        self._spotted = False
        self._source = np.asarray(served_source, dtype=np.float64)
        estimate = self.state.estimate
        for rows, preds, norm, new_model in pending:
            if new_model:
                self.tracker.model_changed()
            if estimate is not None:
                scored = np.log(np.maximum(rows @ floored(estimate, self.floor), 1e-300)) - np.log(np.maximum(norm, 1e-300))
                self._evidence.extend(scored.tolist())
            self.tracker.add(rows, preds)
        change = self.tracker.refresh()
        if change is not None:  # the evidence and spot checks were about the old scene's estimate
            self._evidence.clear()
            self._spots.clear()
        self.state = self._decide()
        return self.state

    def new_scene(self) -> OnlineState:
        """Start a new scene now: the answers not yet taken in are dropped with the old scene's estimate,
        evidence and spot checks."""
        self._pending = []
        self.tracker.new_scene()
        self._evidence.clear()
        self._spots.clear()
        self.state = self._decide()
        return self.state

    def redecide(self, served_source: np.ndarray) -> OnlineState:
        """Decide again for another served model (its prior changes the shift) without taking anything in."""
        self._source = np.asarray(served_source, dtype=np.float64)
        self.state = self._decide()
        return self.state

    def _decide(self) -> OnlineState:
        t = self.tracker
        q = t.estimate()
        if q is None:
            since = " since the last change" if t.changes else ""
            return OnlineState(None, False, f"estimating: {t.segment} of {t.min_samples} samples{since}",
                               None, None, t.segment, t.last_change, t.changes)
        rows, preds = t.scene()
        rows, preds = rows[-self.gain_window:], preds[-self.gain_window:]
        gain = expected_gain(rows, preds, floored(q, self.floor))
        evidence = float(np.sum(self._evidence)) if self._evidence else None
        _, raw_only, corrected_only = self.spots()
        shift = 0.5 * float(np.abs(q - self._source).sum())
        verdict = decide(self.safety, shift, gain, evidence, (raw_only, corrected_only))
        return OnlineState(q, verdict.applied, verdict.reason, gain, evidence, t.segment, t.last_change, t.changes)

    def correct(self, rows: np.ndarray) -> np.ndarray | None:
        """The rows' posteriors under the estimate in force (floored), or None without one."""
        q = self.state.estimate
        return None if q is None else posterior(rows, floored(q, self.floor))


__all__ = [
    "likelihood_rows", "posterior", "expected_gain", "log_evidence", "chi2_quantile", "g_statistic", "Change", "ShareDetector",
    "SceneTracker", "FollowTheHistory", "FlhFtl", "SafetySettings", "Verdict", "spot_verdict", "decide", "OnlineState", "OnlineCorrector",
]
