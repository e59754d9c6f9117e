"""The worker's cost step: before a cycle's heavy work, profile a few training steps of the model and of
a copy pruned at the cycle's level (prune_core.cost.profile_cycle), predict the cycle's peak memory and
duration per phase, and choose the largest batch size ≤ cycle_batch_size whose predicted peak fits
cycle_memory_budget_mb; refuse the cycle when none does. After the cycle, or where it failed or was
aborted, measure the actual values over the span the prediction covers (from the end of the profile)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Protocol

from prune_core.cost_records import PhaseClock

from ..workers.events import CostMeasuredEvent, CostPredictedEvent, StepEvent

if TYPE_CHECKING:
    from prune_core.cost import PeakMeter
    from prune_core.cost_records import CostEstimate, CyclePlan, Profile


class CostLimits(Protocol):
    """What the cost step reads of a cycle's job (daemon.workers.worker.CycleJob has these fields): named here
    so this module does not import the worker that imports it."""

    @property
    def batch_size(self) -> int: ...

    @property
    def memory_budget_mb(self) -> Optional[int]: ...

    @property
    def retrain_scope(self) -> str: ...


class CycleRefused(Exception):
    """No batch size fits the memory budget, or the budget cannot be checked on this device."""


def fallback_scopes(configured: str) -> list[str]:
    """The retraining scopes a budget may use: the configured one, then those that train fewer
    parameters (full → last_bn → last → bias): the most trained that fits is chosen."""
    from prune_core.options import RetrainScope

    order = [RetrainScope.FULL, RetrainScope.LAST_BN, RetrainScope.LAST, RetrainScope.BIAS]
    return [s.value for s in order[order.index(RetrainScope(configured)):]]


def choose(profiles: Iterable[Profile], plan: CyclePlan, job: CostLimits, post: Callable) -> CostEstimate:
    """The estimate at the retraining scope and batch size the cycle will use, posted. `profiles`: one
    per scope of `fallback_scopes`, measured lazily (the next only when the previous does not fit; no
    budget, only the first). CycleRefused, naming each scope's figures, when nothing fits."""
    from prune_core.cost_records import DoesNotFit, fit_budget
    from prune_core.options import RetrainScope

    refusals, last = [], None
    for measured in profiles:
        try:
            chosen = fit_budget(measured, plan, job.batch_size, job.memory_budget_mb)
        except DoesNotFit as exc:
            refusals.append(f"retraining scope {measured.scope}: {exc}")
            last = exc
            continue
        changed = [f"{name} {new} (not {old})" for name, new, old in
                   (("retraining scope", chosen.scope, RetrainScope(job.retrain_scope).value),
                    ("batch size", chosen.batch_size, job.batch_size)) if new != old]
        note = " and ".join(changed) + f" to fit cycle_memory_budget_mb={job.memory_budget_mb}" if changed else ""
        post(CostPredictedEvent(chosen, job.memory_budget_mb, note))
        return chosen
    reason = "; ".join(refusals)
    assert last is not None, "fallback_scopes gives at least one scope"
    post(CostPredictedEvent(last.estimate, job.memory_budget_mb, f"refused: {reason}"))
    raise CycleRefused(reason)


@dataclass
class CostWatch:
    """Measures the actual peak memory and duration from its start; `clock` times the phases (pass it to
    run_cycle)."""

    meter: PeakMeter | None
    started: float
    clock: PhaseClock = field(default_factory=PhaseClock)

    def paused(self, seconds: float) -> None:
        """Leave time the cycle spent paused out of its duration: the prediction is of the work."""
        self.started += seconds
        self.clock.discount(seconds)

    def measured(self, complete: bool = True) -> CostMeasuredEvent:
        """What was spent so far: the whole cycle's cost, or (`complete` False) a failed or aborted one's."""
        from prune_core.cost_records import CostError, MeasuredCost

        try:
            peak = self.meter.peak_mb() if self.meter is not None else float("nan")
        except CostError:
            peak = float("nan")
        source = self.meter.source if self.meter is not None else None
        return CostMeasuredEvent(MeasuredCost(peak, time.monotonic() - self.started, source, self.clock.phases(), complete))


def predict_cost(job: CostLimits, teacher, card, train_set, held_set, config, extra_models: int, post: Callable):
    """(`config` with the chosen retraining scope and batch size, a CostWatch started now). `extra_models`:
    copies of the model the caller holds beside run_cycle's. Without a budget, a cost that cannot be
    measured here is noted and the cycle goes on; with one, the cycle is refused."""
    from prune_core.cost import PeakMeter, plan_cycle, profile_cycle
    from prune_core.cost_records import CostError, profile_batches

    batch_sizes = profile_batches(job.batch_size)
    scopes = fallback_scopes(config.train.scope.value) if job.memory_budget_mb is not None else [config.train.scope.value]

    def profiles():
        for scope in scopes:
            post(StepEvent("profile", {"batch_sizes": list(batch_sizes), "retrain_scope": scope}))
            scoped = replace(config, train=replace(config.train, scope=scope))
            yield profile_cycle(teacher, train_set, held_set, card.mean, card.std, scoped, card.input_size, batch_sizes)

    plan = plan_cycle(config, len(train_set), len(held_set), extra_models, len(train_set) - train_set.labelled)
    try:
        chosen = choose(profiles(), plan, job, post)
        meter = PeakMeter(next(teacher.parameters()).device)
        meter.reset()
    except CostError as exc:
        if job.memory_budget_mb is not None:
            raise CycleRefused(f"cycle_memory_budget_mb={job.memory_budget_mb} cannot be checked here: {exc}") from None
        post(CostPredictedEvent(None, None, f"no prediction: {exc}"))
        return config, CostWatch(None, time.monotonic())
    train = replace(config.train, batch_size=chosen.batch_size, scope=chosen.scope)
    return replace(config, train=train), CostWatch(meter, time.monotonic())
