"""Paired evidence that a candidate answers as well as its teacher: exact bounds and an anytime-valid one.

Python and numpy only (no torch): the daemon re-checks a pending candidate with it as labels arrive.

Top-1 loss of a candidate S against a teacher T is L = P(T right, S wrong) - P(S right, T wrong).
Both terms live on the samples where the two disagree, so with d = P(disagree) and, on a
disagreement, Z = 1{T right} - 1{S right} in {-1, 0, 1}: L = d * E[Z | disagree] <= d. Hence:
- the disagreement rate bounds the loss exactly, without a label (Clopper-Pearson upper bound on d);
- labels are needed only where the two disagree, and E[Z | disagree] is what they estimate; its
  sign on discordant pairs is McNemar's test (exact: binomial with p = 1/2);
- re-checking after every label needs a bound valid at every sample size at once: a confidence
  sequence. `betting_upper_bounds` is the hedged-capital (predictable plug-in) betting CS of
  Waudby-Smith & Ramdas (JRSS-B 2023, "Estimating means of bounded random variables by betting"),
  one-sided, with its running intersection.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np


# ---- exact binomial ---------------------------------------------------------------------------
def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    terms = [_log_pmf(i, n, p) for i in range(k + 1)]
    top = max(terms)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_cdf(k - 1, n, p) if k > n / 2 else _upper_tail(k, n, p)


def _upper_tail(k: int, n: int, p: float) -> float:
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    terms = [_log_pmf(i, n, p) for i in range(k, n + 1)]
    top = max(terms)
    return 0.0 if top == -math.inf else min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _bisect(f, lo: float, hi: float, iterations: int = 60) -> float:
    """The root of a function increasing from f(lo) < 0 to f(hi) >= 0, to within (hi - lo) / 2**60."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if f(mid) >= 0:
            hi = mid
        else:
            lo = mid
    return hi


@lru_cache(maxsize=1024)  # a pending candidate is re-judged on the same counts after every label
def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided exact upper confidence bound (level 1 - alpha) on a rate seen k times in n: the p at
    which P(X <= k) = alpha. 1.0 without samples."""
    if n <= 0 or k >= n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    return _bisect(lambda p: alpha - binom_cdf(k, n, p), 0.0, 1.0)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided exact lower confidence bound on a rate seen k times in n (0.0 when k is 0)."""
    if n <= 0 or k <= 0:
        return 0.0
    return 1.0 - clopper_pearson_upper(n - k, n, alpha)


def mcnemar_exact(student_only: int, teacher_only: int) -> float:
    """One-sided exact McNemar p-value for "the teacher is right more often than the student" on
    paired samples: of the m discordant pairs (exactly one of the two right), `teacher_only` ~
    Binomial(m, 1/2) if both were as good. 1.0 without discordant pairs."""
    m = student_only + teacher_only
    return 1.0 if m == 0 else binom_sf(teacher_only, m, 0.5)


def normal_upper(mean: float, se: float, alpha: float) -> float:
    """mean + z(1 - alpha) * se: a one-sided bound for an average over many samples (CLT)."""
    return mean + NormalDist().inv_cdf(1.0 - alpha) * se


# ---- anytime-valid: a betting confidence sequence ----------------------------------------------
GRID = np.linspace(0.0, 1.0, 4001)  # the candidate means m a confidence sequence tests (a 1/4000 step, rounded up)


def _predictable_bets(xs: Sequence[float], alpha: float) -> list[float]:
    """The predictable plug-in bets lambda_t = sqrt(2 log(1/alpha) / (sigma2_{t-1} t log(1 + t))), with
    sigma2 the regularised running variance (prior mean 1/2, variance 1/4, one fake observation)."""
    bets, total, squares, sigma2 = [], 0.0, 0.25, 0.25
    for t, x in enumerate(xs, start=1):
        bets.append(math.sqrt(2.0 * math.log(1.0 / alpha) / (sigma2 * t * math.log1p(t))))
        total += x
        squares += (x - (0.5 + total) / (t + 1)) ** 2
        sigma2 = squares / (t + 1)
    return bets


def betting_upper_bounds(xs: Sequence[float], alpha: float, c: float = 0.5) -> list[float]:
    """Upper confidence sequence on the mean of observations in [0, 1], after each one: with
    probability >= 1 - alpha the mean lies below every bound at once, however many times it is looked
    at. The capital of betting that the mean is below m, K_t(m) = prod(1 + lambda_i (m - x_i)) with
    each bet truncated at c / (1 - m), is a nonnegative martingale at the true mean, so by Ville's
    inequality it reaches 1/alpha with probability <= alpha; m is excluded once it has. K grows with
    m, so the excluded means are [m*, 1]: each bound is the smallest excluded grid point so far (the
    running intersection), rounded up."""
    log_capital = np.zeros_like(GRID)
    cap = np.divide(c, 1.0 - GRID, out=np.full_like(GRID, np.inf), where=GRID < 1.0)
    threshold, out, best = math.log(1.0 / alpha), [], 1.0
    for x, lam in zip(xs, _predictable_bets(xs, alpha)):
        log_capital += np.log1p(np.minimum(lam, cap) * (GRID - x))
        excluded = np.flatnonzero(log_capital >= threshold)
        if excluded.size:
            best = min(best, float(GRID[excluded[0]]))
        out.append(best)
    return out


def betting_lower_bounds(xs: Sequence[float], alpha: float, c: float = 0.5) -> list[float]:
    """The lower confidence sequence: 1 - the upper one of 1 - x."""
    return [1.0 - u for u in betting_upper_bounds([1.0 - x for x in xs], alpha, c)]


# ---- the record a cycle judges by -------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """The teacher on the labelled samples it never learnt from: how often right, against how often
    its own probabilities expect (the sum of p(its answer)) and that sum's variance if calibrated."""

    labelled: int = 0
    correct: int = 0
    expected: float = 0.0
    variance: float = 0.0

    @property
    def z(self) -> float:
        """(right - expected) / its standard deviation; 0 without labels."""
        return (self.correct - self.expected) / math.sqrt(self.variance) if self.variance > 0 else 0.0

    def refuted(self, alpha: float) -> bool:
        """The labels show the teacher miscalibrated beyond its own error (two-sided, level alpha)."""
        return self.labelled > 0 and abs(self.z) > NormalDist().inv_cdf(1.0 - alpha / 2)


@dataclass(frozen=True)
class Disagreement:
    """A judging sample the candidate and the teacher answer differently (class indices)."""

    key: str
    teacher: int
    candidate: int


@dataclass(frozen=True)
class JudgingEvidence:
    """A candidate against its teacher on the judging samples (none took part in its training):
    how many, how many they disagree on, the loss the teacher's probabilities expect (mean and
    standard error over all of them), the teacher's calibration on the labels there are, and the
    disagreements whose labels would decide (at most `max_asked`, in a random order fixed once)."""

    samples: int
    disagreements: int
    expected_loss: float
    expected_loss_se: float
    calibration: Calibration = field(default_factory=Calibration)
    asked: tuple[Disagreement, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "JudgingEvidence":
        return cls(data["samples"], data["disagreements"], data["expected_loss"], data["expected_loss_se"],
                   Calibration(**data.get("calibration", {})), tuple(Disagreement(**d) for d in data.get("asked", ())))

    def outcomes(self, labels: Mapping[str, int]) -> list[int]:
        """Z = 1{teacher right} - 1{candidate right} for the asked disagreements, in their order, up to
        the first without a label: a prefix of a random order is a random sample however the labels
        arrive, so a labeller who picks the easy ones first cannot bias it."""
        out = []
        for d in self.asked:
            label = labels.get(d.key)
            if label is None:
                break
            out.append(int(label == d.teacher) - int(label == d.candidate))
        return out


@dataclass(frozen=True)
class PairedBound:
    """Bounds on the top-1 loss from labelled disagreements (each at its own level; see `paired_bound`)."""

    labelled: int  # the prefix of asked disagreements with a label
    student_only: int  # of them, right by the candidate only
    teacher_only: int  # right by the teacher only
    mcnemar_p: float  # exact one-sided p-value that the teacher is better on them
    lower: float
    upper: float


def paired_bound(evidence: JudgingEvidence, labels: Mapping[str, int], alpha_rate: float, alpha_labels: float) -> PairedBound:
    """The loss L = d * E[Z | disagree], bounded by the Clopper-Pearson bounds on d (level alpha_rate)
    times the betting confidence sequence on E[Z | disagree] over the labelled prefix (alpha_labels):
    valid however often it is re-checked as labels arrive."""
    z = evidence.outcomes(labels)
    n, k = evidence.samples, evidence.disagreements
    d_hi, d_lo = clopper_pearson_upper(k, n, alpha_rate), clopper_pearson_lower(k, n, alpha_rate)
    lower, upper = -d_hi, d_hi  # nothing labelled: L lies within [-d, d]
    if z:
        xs = [(v + 1) / 2 for v in z]
        z_hi = 2 * betting_upper_bounds(xs, alpha_labels)[-1] - 1
        z_lo = 2 * betting_lower_bounds(xs, alpha_labels)[-1] - 1
        upper = d_hi * z_hi if z_hi >= 0 else d_lo * z_hi
        lower = d_lo * z_lo if z_lo >= 0 else d_hi * z_lo
    student_only, teacher_only = sum(v < 0 for v in z), sum(v > 0 for v in z)
    return PairedBound(len(z), student_only, teacher_only, mcnemar_exact(student_only, teacher_only), lower, upper)
