"""The seed paper's DaPR search: the most pruned model whose held-out accuracy stays within a
tolerance of the unpruned model fine-tuned on the same data, by binary search over a level grid."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95


@dataclass
class Probe:
    """One tried level: what it cost and whether it kept accuracy."""

    level: float
    achieved_level: float
    accuracy: float
    params: int
    macs: int
    seconds: float
    feasible: bool = False
    criterion: str = ""  # the criterion whose model this is
    allocation: str = ""  # how its level was spread over the layers (uniform or global)
    tried: dict[str, float] = field(default_factory=dict)  # held-out top-1 of each criterion/allocation tried here
    retrain_epochs: int = 0  # epochs the kept model was retrained for (early stopping and its cool-down included)
    kept_epoch: int = 0  # the retraining epoch whose weights were kept (0: none beat the freshly pruned model)
    early_stop_epoch: int | None = None  # where early stopping fired; None: the schedule ran out
    retrain_front: str = ""  # how retraining ran a frozen front: apart (its cut), or whole and why (TrainResult.front)
    clipped_steps: int = 0  # retraining steps whose gradient was clipped (TrainConfig.max_grad_norm)
    retrain_steps: int = 0  # optimizer steps the kept model was retrained for
    resumed_epoch: int = 0  # the epoch its retraining resumed after, from a checkpoint (0: it ran from the start)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult(Generic[T]):
    level: float  # 0.0 when no grid level kept accuracy
    best: T | None
    probes: list[Probe]
    best_probe: Probe | None = None  # the probe of `best`: its criterion, allocation and cost


def search_level(
    try_level: Callable[[float], tuple[Probe, T]],
    ceiling: float,
    tolerance: float,
    grid: Sequence[float] = DEFAULT_GRID,
    on_probe: Callable[[Probe], None] | None = None,
) -> SearchResult[T]:
    """Binary search for the largest feasible level, assuming feasibility falls as the level rises.

    `try_level(level)` prunes, retrains and evaluates; a probe is feasible when its accuracy is at
    least `ceiling - tolerance`. About log2(len(grid)) probes are run.
    """
    lo, hi = 0, len(grid) - 1
    best: T | None = None
    best_level, best_probe = 0.0, None
    probes: list[Probe] = []
    while lo <= hi:
        mid = (lo + hi) // 2
        probe, candidate = try_level(grid[mid])
        probe.feasible = probe.accuracy >= ceiling - tolerance
        probes.append(probe)
        if on_probe is not None:
            on_probe(probe)
        if probe.feasible:
            best, best_level, best_probe = candidate, grid[mid], probe
            lo = mid + 1
        else:
            hi = mid - 1
    return SearchResult(best_level, best, probes, best_probe)
