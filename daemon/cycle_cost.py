"""The worker's cost step: before a cycle's heavy work, profile a few training steps (prune_core.cost),
predict the cycle's peak memory and duration, and choose the largest batch size ≤ cycle_batch_size
whose predicted peak fits cycle_memory_budget_mb; refuse the cycle when none does. After the cycle,
measure the actual values over the span the prediction covers (from the end of the profile)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from .events import CostMeasuredEvent, CostPredictedEvent, StepEvent

if TYPE_CHECKING:
    from prune_core.cost import CostEstimate, CyclePlan, PeakMeter, Profile

    from .worker import CycleJob


class CycleRefused(Exception):
    """No batch size fits the memory budget, or the budget cannot be checked on this device."""


def choose(profile: "Profile", plan: "CyclePlan", job: "CycleJob", post: Callable) -> "CostEstimate":
    """The estimate at the batch size the cycle will use, posted; CycleRefused when nothing fits."""
    from prune_core.cost import DoesNotFit, fit_budget

    try:
        chosen = fit_budget(profile, plan, job.batch_size, job.memory_budget_mb)
    except DoesNotFit as exc:
        post(CostPredictedEvent(exc.estimate, job.memory_budget_mb, f"refused: {exc}"))
        raise CycleRefused(str(exc)) from None
    note = "" if chosen.batch_size == job.batch_size else (
        f"batch size {chosen.batch_size} (not {job.batch_size}) to fit cycle_memory_budget_mb={job.memory_budget_mb}")
    post(CostPredictedEvent(chosen, job.memory_budget_mb, note))
    return chosen


@dataclass
class CostWatch:
    """Measures the actual peak memory and duration from its start."""

    meter: "PeakMeter | None"
    started: float

    def measured(self) -> CostMeasuredEvent:
        from prune_core.cost import MeasuredCost

        peak = self.meter.peak_mb() if self.meter is not None else float("nan")
        source = self.meter.source if self.meter is not None else None
        return CostMeasuredEvent(MeasuredCost(peak, time.monotonic() - self.started, source))


def predict_cost(job: "CycleJob", teacher, card, train_set, held_set, config, extra_models: int, post: Callable):
    """(`config` with the chosen batch size, a CostWatch started now). `extra_models`: copies of the model
    the caller holds beside run_cycle's. Without a budget, a cost that cannot be measured here is noted
    and the cycle goes on; with one, the cycle is refused."""
    from prune_core.cost import CostError, CyclePlan, PeakMeter, profile, profile_batches

    batch_sizes = profile_batches(job.batch_size)
    post(StepEvent("profile", {"batch_sizes": list(batch_sizes)}))
    try:
        measured = profile(teacher, train_set, held_set, card.mean, card.std, config.train, batch_sizes)
        meter = PeakMeter(next(teacher.parameters()).device)
        meter.reset()
    except CostError as exc:
        if job.memory_budget_mb is not None:
            raise CycleRefused(f"cycle_memory_budget_mb={job.memory_budget_mb} cannot be checked here: {exc}") from None
        post(CostPredictedEvent(None, None, f"no prediction: {exc}"))
        return config, CostWatch(None, time.monotonic())
    plan = CyclePlan.of_cycle(config, len(train_set), len(held_set), extra_models)
    chosen = choose(measured, plan, job, post)
    return replace(config, train=replace(config.train, batch_size=chosen.batch_size)), CostWatch(meter, time.monotonic())
