"""prune_core.level_search: binary search over the level grid for the most pruned feasible level."""
from __future__ import annotations

import math

import pytest

from prune_core.level_search import DEFAULT_GRID, Probe, search_level


def monotone(threshold: float, calls: list[float]):
    """Accuracy 0.9 up to `threshold`, then falling linearly: feasibility falls as the level rises."""

    def try_level(level: float):
        calls.append(level)
        acc = 0.9 if level <= threshold + 1e-9 else 0.9 - 0.5 * (level - threshold) - 0.05
        probe = Probe(level=level, achieved_level=level, accuracy=acc, params=int(1000 * (1 - level)), macs=0, seconds=0.0)
        return probe, f"model@{level}"

    return try_level


def test_grid():
    assert len(DEFAULT_GRID) == 19 and DEFAULT_GRID[0] == 0.05 and DEFAULT_GRID[-1] == 0.95


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.25, 0.5, 0.55, 0.7, 0.85, 0.9, 0.95])
def test_finds_largest_feasible_grid_level(threshold):
    calls: list[float] = []
    seen: list[Probe] = []
    result = search_level(monotone(threshold, calls), ceiling=0.92, tolerance=0.03, on_probe=seen.append)
    assert result.level == pytest.approx(threshold)
    assert result.best == f"model@{result.level}"
    assert len(result.probes) <= 5 == math.ceil(math.log2(len(DEFAULT_GRID) + 1))
    assert [p.level for p in result.probes] == calls == [p.level for p in seen]
    assert len(set(calls)) == len(calls)  # no level probed twice
    assert all(p.feasible == (p.level <= threshold + 1e-9) for p in result.probes)
    assert any(p.feasible and p.level == result.level for p in result.probes)


@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.049])
def test_no_feasible_level(threshold):
    calls: list[float] = []
    result = search_level(monotone(threshold, calls), ceiling=0.92, tolerance=0.03)
    assert result.level == 0.0
    assert result.best is None
    assert 1 <= len(result.probes) <= 5
    assert not any(p.feasible for p in result.probes)
    assert calls[-1] == DEFAULT_GRID[0]  # it tried down to the smallest level


def test_feasibility_boundary_is_inclusive():
    result = search_level(lambda lv: (Probe(lv, lv, 0.5, 0, 0, 0.0), lv), ceiling=0.75, tolerance=0.25)
    assert result.level == DEFAULT_GRID[-1]


def test_custom_grid():
    calls: list[float] = []
    result = search_level(monotone(0.3, calls), ceiling=0.9, tolerance=0.0, grid=[0.1, 0.2, 0.3, 0.4])
    assert result.level == 0.3 and len(result.probes) <= 3
