"""prune_core.evidence: exact binomial bounds, McNemar, and the betting confidence sequence's
validity however often it is looked at (by simulation, fixed seeds, thresholds far from the edge)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from prune_core.evidence import (
    Calibration, Disagreement, JudgingEvidence, betting_lower_bounds, betting_upper_bounds, binom_cdf, binom_sf,
    clopper_pearson_lower, clopper_pearson_upper, mcnemar_exact, normal_upper, paired_bound,
)


def test_binomial_tails_match_exact_sums():
    assert binom_cdf(0, 10, 0.5) == pytest.approx(1 / 1024, rel=1e-12)
    assert binom_sf(9, 10, 0.5) == pytest.approx(11 / 1024, rel=1e-9)
    assert binom_cdf(30, 100, 0.2) + binom_sf(31, 100, 0.2) == pytest.approx(1.0, abs=1e-12)
    exact = sum(math.comb(100, i) * 0.2**i * 0.8 ** (100 - i) for i in range(31))
    assert binom_cdf(30, 100, 0.2) == pytest.approx(exact, rel=1e-10)
    assert binom_cdf(-1, 5, 0.3) == 0.0 and binom_cdf(5, 5, 0.3) == 1.0 and binom_sf(0, 5, 0.3) == 1.0


def test_clopper_pearson_known_values():
    # closed form at k = 0; beta quantiles (scipy.stats.beta.ppf(0.95, 4, 7) = 0.6066242161054123) elsewhere
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05**0.1, rel=1e-12)
    assert clopper_pearson_upper(3, 10, 0.05) == pytest.approx(0.6066242161054123, rel=1e-9)
    assert clopper_pearson_lower(3, 10, 0.05) == pytest.approx(0.08726443391415033, rel=1e-9)
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0 and clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0
    # no disagreement in 300 samples bounds the rate below 1 % at 95 %: the label-free accept's size
    assert clopper_pearson_upper(0, 300, 0.05) < 0.01 < clopper_pearson_upper(0, 250, 0.05)


def test_clopper_pearson_is_monotone():
    ups = [clopper_pearson_upper(k, 200, 0.05) for k in range(0, 201, 10)]
    assert ups == sorted(ups) and all(u > k / 200 for u, k in zip(ups, range(0, 201, 10)) if k < 200)
    assert [clopper_pearson_upper(5, n, 0.05) for n in (50, 100, 400)] == sorted([clopper_pearson_upper(5, n, 0.05) for n in (50, 100, 400)], reverse=True)
    assert clopper_pearson_upper(5, 100, 0.01) > clopper_pearson_upper(5, 100, 0.05)


def test_cp_covers_at_its_level():
    rng = np.random.default_rng(0)
    p, n = 0.05, 200
    misses = sum(clopper_pearson_upper(int(k), n, 0.05) < p for k in rng.binomial(n, p, 2000))
    assert misses / 2000 < 0.07  # at most 5 % in theory (exact tests are conservative)


def test_mcnemar_exact():
    assert mcnemar_exact(1, 9) == pytest.approx(11 / 1024, rel=1e-9)
    assert mcnemar_exact(5, 5) == pytest.approx(sum(math.comb(10, i) for i in range(5, 11)) / 1024)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(9, 1) > 0.99


def test_normal_upper():
    assert normal_upper(0.01, 0.002, 0.05) == pytest.approx(0.01 + 1.6448536 * 0.002, rel=1e-6)


def test_the_confidence_sequence_narrows_and_covers_the_mean():
    rng = np.random.default_rng(1)
    xs = list(rng.choice([0.0, 0.5, 1.0], 300, p=[0.3, 0.3, 0.4]))  # mean 0.55
    up, lo = betting_upper_bounds(xs, 0.05), betting_lower_bounds(xs, 0.05)
    assert all(a >= b for a, b in zip(up, up[1:])) and all(a <= b for a, b in zip(lo, lo[1:]))  # running intersection
    assert lo[-1] < 0.55 < up[-1] and up[-1] - lo[-1] < 0.25
    assert betting_upper_bounds([], 0.05) == []


def _capital_crosses(xs: np.ndarray, m: float, alpha: float) -> bool:
    """Whether the upper sequence ever excludes m, from the bounds themselves."""
    return min(betting_upper_bounds(list(xs), alpha)) < m


def test_anytime_valid_where_repeated_fixed_n_tests_are_not():
    """Looking after every observation: the confidence sequence excludes the true mean in at most
    alpha of the runs; the fixed-n normal bound, re-checked the same way, does so far more often."""
    rng = np.random.default_rng(7)
    alpha, mean, runs, n = 0.1, 0.5, 200, 100
    cs_miss = naive_miss = 0
    for _ in range(runs):
        xs = rng.choice([0.0, 0.5, 1.0], n, p=[0.25, 0.5, 0.25])
        cs_miss += _capital_crosses(xs, mean, alpha)
        t = np.arange(1, n + 1)
        running = np.cumsum(xs) / t
        sd = np.sqrt(np.maximum(np.cumsum(xs**2) / t - running**2, 1e-12))
        naive_miss += bool(np.any((running + 1.2816 * sd / np.sqrt(t))[4:] < mean))
    assert cs_miss / runs <= alpha  # 0.1 in theory; the sequence is conservative
    assert naive_miss / runs > 2 * alpha  # peeking at a fixed-n bound inflates its error


def _evidence(samples=1000, disagreements=50, asked=20) -> JudgingEvidence:
    return JudgingEvidence(samples, disagreements, 0.02, 0.005, Calibration(),
                           tuple(Disagreement(str(i), 0, 1) for i in range(asked)))


def test_outcomes_count_the_labelled_prefix_only():
    ev = _evidence(asked=4)
    assert ev.outcomes({"0": 0, "1": 1, "3": 0}) == [1, -1]  # "2" unlabelled: "3" waits for it
    assert ev.outcomes({"0": 2, "1": 1, "2": 0, "3": 1}) == [0, -1, 1, -1]
    assert JudgingEvidence.from_dict(ev.to_dict()) == ev


def test_paired_bound_brackets_the_loss():
    ev = _evidence(samples=1000, disagreements=50, asked=40)
    none = paired_bound(ev, {}, 0.02, 0.02)
    assert none.labelled == 0 and none.upper == pytest.approx(clopper_pearson_upper(50, 1000, 0.02))
    student = paired_bound(ev, {str(i): 1 for i in range(40)}, 0.02, 0.02)  # the candidate right on all
    assert student.student_only == 40 and student.upper < 0 and student.mcnemar_p == 1.0
    teacher = paired_bound(ev, {str(i): 0 for i in range(40)}, 0.02, 0.02)
    assert teacher.teacher_only == 40 and teacher.lower > 0.01 and teacher.mcnemar_p < 1e-9
    half = paired_bound(ev, {str(i): i % 2 for i in range(40)}, 0.02, 0.02)
    assert half.lower < 0 < half.upper < none.upper


def test_calibration_refuted_only_beyond_its_error():
    assert not Calibration().refuted(0.05)
    fair = Calibration(100, 80, 80.0, 16.0)  # 80 right where it expected 80
    assert fair.z == 0 and not fair.refuted(0.05)
    assert not Calibration(100, 74, 80.0, 16.0).refuted(0.05)  # 1.5 sd
    assert Calibration(100, 60, 80.0, 16.0).refuted(0.05)  # 5 sd overconfident
