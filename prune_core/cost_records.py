"""A cycle's cost as plain records, and the arithmetic from a profile to a prediction.

The records — the phases (`Phase`, `Phases`, `PhaseClock`), what a micro-profile measured
(`ProfileSample`, `Profile`), what a cycle will do (`CyclePlan`), the prediction (`CostEstimate`) and
what was spent (`MeasuredCost`) — travel between the cycle worker and the daemon (events, cycle
records), so this module imports no torch. `estimate` and `fit_budget` turn a profile and a plan into
a prediction; the profile itself is measured by prune_core.cost.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Sequence

from .options import RetrainScope
from .schedule import schedule

if TYPE_CHECKING:
    from .retrain import TrainConfig

MIN_BATCH = 2  # batch norm cannot train on one sample


class CostError(RuntimeError):
    """The cost cannot be measured here (e.g. no way to reset the peak-memory mark)."""


class DoesNotFit(ValueError):
    """No batch size fits the memory budget; `estimate` is the cost at the smallest batch."""

    def __init__(self, reason: str, estimate: CostEstimate):
        super().__init__(reason)
        self.estimate = estimate


class MemorySource(str, Enum):
    """What a peak-memory figure is."""

    RSS = "rss_hwm"  # the process's resident-set high-water mark (CPU)
    CUDA = "cuda_max_allocated"  # torch's CUDA caching allocator, tensors only


class Phase(str, Enum):
    """The parts of a cycle (prune_core.cycle.run_cycle) whose cost is predicted and measured."""

    FINETUNE = "finetune"  # the unpruned model's training: ADaPT fine-tuning, or the level search's ceiling
    RANKING = "ranking"  # the criteria's scoring (data-aware ones: calibration passes)
    PRUNE = "prune"  # per try: the dependency graph's prune to the level, and the MAC counts
    FADE = "fade"  # per try: fading the doomed channels out of the unpruned model
    RETRAIN = "retrain"  # per try: retraining the pruned model
    VALIDATION = "validation"  # held-out evaluations outside train(): before, each try's score, after, agreement


@dataclass(frozen=True)
class Phases:
    """Seconds per phase of a cycle."""

    finetune: float = 0.0
    ranking: float = 0.0
    prune: float = 0.0
    fade: float = 0.0
    retrain: float = 0.0
    validation: float = 0.0

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def __getitem__(self, phase: Phase) -> float:
        return getattr(self, phase.value)


class PhaseClock:
    """Accumulates the seconds a cycle spends in each Phase (`with clock.timing(Phase.PRUNE): ...`);
    `phases()` includes the section under way, so a cycle stopped midway reports what it spent."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._spent = {phase: 0.0 for phase in Phase}
        self._open: tuple[Phase, float] | None = None

    @contextmanager
    def timing(self, phase: Phase):
        if self._open is not None:  # nested: the outer phase keeps counting
            yield
            return
        self._open = phase, self.clock()
        try:
            yield
        finally:
            self._spent[phase] += self.clock() - self._open[1]
            self._open = None

    def discount(self, seconds: float) -> None:
        """Leave `seconds` out of the phase under way (time the cycle spent paused)."""
        if self._open is not None:
            self._open = self._open[0], self._open[1] + seconds

    def phases(self) -> Phases:
        spent = dict(self._spent)
        if self._open is not None:
            spent[self._open[0]] += self.clock() - self._open[1]
        return Phases(**{phase.value: seconds for phase, seconds in spent.items()})


@dataclass(frozen=True)
class Line:
    """y = fixed + per_sample · batch."""

    fixed: float
    per_sample: float

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch

    @staticmethod
    def fit(points: Sequence[tuple[float, float]]) -> Line:
        """Least squares through (batch, value) points at two or more batch sizes. A negative slope
        (noise: more samples never cost less) is clamped to 0, with the mean as the intercept."""
        xs = [float(x) for x, _ in points]
        if len(set(xs)) < 2:
            raise ValueError("a line needs points at two or more batch sizes")
        ys = [float(y) for _, y in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope < 0:
            return Line(my, 0.0)
        return Line(my - slope * mx, slope)


@dataclass(frozen=True)
class ProfileSample:
    """The training steps measured at one batch size."""

    batch_size: int
    peak_mb: float
    step_s: float  # median time of one step (the first, warm-up step excluded)
    saved_mb: float  # tensors autograd keeps for the backward pass of one step (activations, exactly counted)
    run_overhead_s: float  # what one train() run costs beyond its steps: the first step's warm-up, set-up, teardown


@dataclass(frozen=True)
class Profile:
    """What the micro-profile measured on this device."""

    samples: tuple[ProfileSample, ...]
    eval_batch: int
    eval_extra_mb: float  # what one evaluation pass adds to what the process held when it began
    eval_image_s: float  # one held-out image evaluated (forward, no graph)
    model_mb: float  # one copy of the model's parameters and buffers
    source: MemorySource
    device: str
    seconds: float  # what the profile itself took
    scope: str = "full"  # the retraining scope (TrainConfig.scope) the steps ran with
    params: int = 0  # the profiled model's parameters
    pruned: Profile | None = None  # the same, of a copy pruned at the cycle's level (None: costed as this one)
    level: float = 0.0  # the level that copy was pruned to
    prune_s: float = 0.0  # one prune to that level (dependency graph, bisection on copies)
    prune_extra_mb: float = 0.0  # what that prune adds to what the process held when it began
    macs_s: float = 0.0  # one MAC count of the pruned model

    @property
    def memory(self) -> Line:
        """The slope from the activations autograd saves (exactly counted, so linear in the batch); the
        intercept from the peak measured at the largest profiled batch. Two peaks a few MiB apart would
        give a slope of allocator noise (a heap keeps what it freed); the saved tensors are the part
        that scales with the batch."""
        per_sample = Line.fit([(s.batch_size, s.saved_mb) for s in self.samples]).per_sample
        top = max(self.samples, key=lambda s: s.batch_size)
        return Line(top.peak_mb - per_sample * top.batch_size, per_sample)

    @property
    def step(self) -> Line:
        return Line.fit([(s.batch_size, s.step_s) for s in self.samples])

    @property
    def run_overhead_s(self) -> float:
        """As measured at the last profiled batch: the first carries the process's cold start (kernels set
        up on first use), which the profile has paid and the cycle that follows it does not pay again."""
        return max(self.samples, key=lambda s: s.batch_size).run_overhead_s


@dataclass(frozen=True)
class CyclePlan:
    """What a cycle will do, in the counts its cost depends on."""

    train_samples: int
    held_samples: int
    epochs: int  # retraining epochs per try
    min_steps: int = 0
    finetune_epochs: int = 0  # ADaPT fine-tuning, or the ceiling's fine-tuning under level="auto"
    finetune_distils: bool = True  # the fine-tuning asks the teacher on every batch (else only where a row is unlabelled)
    unlabelled_share: float = 0.0  # of the training samples
    fade_epochs: int = 0
    probes: int = 1  # levels tried
    tries: int = 1  # criterion × allocation pairs per level
    forward_rankings: int = 0  # data-aware criteria that rank by forward passes
    backward_rankings: int = 0  # ... and by gradients
    calibration_batches: int = 32
    unpruned_evals: int = 2  # held-out passes of the unpruned model outside train(): before, agreement's teacher side
    pruned_evals: int = 2  # ... of the kept pruned model: after, agreement (each try's score is counted per try)
    mac_counts: int = 2  # MAC counts outside the probes: the summary's before and after
    extra_models: int = 1  # unpruned copies held beside the teacher, the student and its best state
    pruned_copies: int = 0  # pruned copies held beside them (the level search's best so far)
    auto: bool = False  # level="auto": the probes are a bound, each costed at the profiled level

    @classmethod
    def of_retrain(cls, config: TrainConfig, train_samples: int, held_samples: int) -> CyclePlan:
        """The plan of one `train()` run of the unpruned model (what bench/cost_bench.py measures)."""
        return cls(train_samples, held_samples, config.epochs, min_steps=config.min_steps, probes=0, tries=0,
                   unpruned_evals=0, pruned_evals=0, mac_counts=0, extra_models=0, finetune_epochs=config.epochs)


@dataclass(frozen=True)
class CostEstimate:
    """A cycle's predicted cost at one batch size."""

    batch_size: int
    peak_mb: float
    duration_s: float
    phases: Phases
    train_peak_mb: float  # the training steps' peak, model copies included
    eval_peak_mb: float  # the evaluation passes' peak, model copies included
    source: MemorySource
    device: str
    profile_batches: tuple[int, ...]
    profile_s: float
    scope: str = "full"  # the retraining scope it is for
    params: int = 0  # the unpruned model's parameters
    pruned_params: int = 0  # the parameters of the copy the probes are costed at (params: none was pruned)
    pruned_level: float = 0.0  # the level that copy was pruned to
    prune_peak_mb: float = 0.0  # the prunes' peak (the bisection's copies, the graph), model copies included; 0: not profiled
    method: str = "micro-profile: real training steps at the profile batch sizes, extrapolated linearly"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["source"] = self.source.value
        data["profile_batches"] = list(self.profile_batches)
        return data


@dataclass(frozen=True)
class MeasuredCost:
    """A cycle's actual cost, measured over the span the estimate predicts, or (`complete` False: it
    failed or was aborted) up to where it stopped."""

    peak_mb: float
    duration_s: float
    source: MemorySource | None  # None: the peak could not be measured here
    phases: Phases | None = None  # None: not timed per phase
    complete: bool = True

    def to_dict(self) -> dict:
        return {"peak_mb": self.peak_mb, "duration_s": self.duration_s, "source": self.source.value if self.source else None,
                "phases": asdict(self.phases) if self.phases is not None else None, "complete": self.complete}


def _train_run_s(plan: CyclePlan, epochs: int, batch: int, step_s: float, overhead_s: float, eval_pass_s: float, judged: bool) -> float:
    """One `train()`: its steps, and where judged its held-out passes (before, after each epoch, and
    the teacher's answers once)."""
    if epochs == 0 or plan.train_samples == 0:
        return 0.0
    run_epochs, per_epoch = schedule(plan.train_samples, batch, epochs, plan.min_steps)
    trained = per_epoch - (1 if plan.train_samples % batch == 1 else 0)  # a last batch of one is skipped
    return overhead_s + run_epochs * trained * step_s + ((run_epochs + 2) * eval_pass_s if judged else 0.0)


def estimate(profile: Profile, plan: CyclePlan, batch_size: int) -> CostEstimate:
    """The cost of `plan` at `batch_size` from `profile`'s lines; the probes' retraining and scoring
    from `profile.pruned`'s where it has one (else the unpruned model's: an upper bound)."""
    pruned = profile.pruned or profile
    step_s, pruned_step_s = profile.step.at(batch_size), pruned.step.at(batch_size)
    image_s = profile.eval_image_s
    eval_pass_s, pruned_pass_s = plan.held_samples * image_s, plan.held_samples * pruned.eval_image_s

    def overhead_s(p: Profile) -> float:
        # a run of the last stages first re-estimates its frozen front's statistics (prune_core.front):
        # one pass without a graph over the training samples, costed as the model's evaluation
        return p.run_overhead_s + (plan.train_samples * p.eval_image_s if p.scope == RetrainScope.LAST.value else 0.0)

    retrain = _train_run_s(plan, plan.epochs, batch_size, pruned_step_s, overhead_s(pruned), pruned_pass_s, judged=True)
    fade = _train_run_s(plan, plan.fade_epochs, batch_size, step_s, overhead_s(profile), eval_pass_s, judged=False)
    # the profiled step includes the teacher's forward pass (about an evaluation's per-image time per sample);
    # fine-tuning without distillation asks it only for batches with an unlabelled row
    asks = 1.0 if plan.finetune_distils else 1.0 - (1.0 - plan.unlabelled_share) ** batch_size
    finetune_step_s = max(step_s - (1.0 - asks) * batch_size * image_s, 0.0)
    finetune = _train_run_s(plan, plan.finetune_epochs, batch_size, finetune_step_s, overhead_s(profile), eval_pass_s, judged=True)
    calibration = min(plan.calibration_batches, math.ceil(plan.train_samples / batch_size)) if plan.train_samples else 0
    tries = plan.probes * plan.tries
    phases = Phases(
        finetune=finetune,
        ranking=calibration * (plan.forward_rankings * batch_size * image_s + plan.backward_rankings * step_s),
        prune=tries * (profile.prune_s + profile.macs_s) + plan.mac_counts * profile.macs_s,
        fade=tries * fade,
        retrain=tries * retrain,
        validation=plan.unpruned_evals * eval_pass_s + (plan.pruned_evals + tries) * pruned_pass_s,
    )
    copies = plan.extra_models * profile.model_mb + plan.pruned_copies * pruned.model_mb
    # the unpruned model trains where the cycle fine-tunes, fades or ranks by gradients; the pruned one in every try
    trains_unpruned = plan.finetune_epochs > 0 or plan.fade_epochs > 0 or plan.backward_rankings > 0 or tries == 0
    lines = [profile.memory] * trains_unpruned + [pruned.memory] * (tries > 0)
    train_line = max(lines, key=lambda line: line.at(batch_size))
    train_peak = train_line.at(batch_size) + copies
    # Evaluated and pruned while the training state is held. The resident set also keeps the heap that the
    # training steps' activations freed (glibc does not hand it back), so there they add up; CUDA's
    # allocated bytes count live tensors only.
    base = train_line.at(batch_size) if profile.source is MemorySource.RSS else train_line.fixed
    eval_peak = base + profile.eval_extra_mb + copies
    prune_peak = base + profile.prune_extra_mb + copies if tries > 0 and profile.pruned is not None else 0.0
    method = "micro-profile: real training steps at the profile batch sizes, extrapolated linearly"
    if profile.pruned is not None:
        method += f"; the probes at a copy pruned to {profile.level:g} (l1)"
    if plan.auto:
        method += f"; level auto: {plan.probes} probes (a binary search's deepest path), each costed at that copy"
    return CostEstimate(
        batch_size=batch_size, peak_mb=max(train_peak, eval_peak, prune_peak), duration_s=phases.total, phases=phases,
        train_peak_mb=train_peak, eval_peak_mb=eval_peak, source=profile.source, device=profile.device,
        profile_batches=tuple(s.batch_size for s in profile.samples), profile_s=profile.seconds, scope=profile.scope,
        params=profile.params, pruned_params=pruned.params, pruned_level=profile.level if profile.pruned else 0.0,
        prune_peak_mb=prune_peak, method=method,
    )


def fit_budget(profile: Profile, plan: CyclePlan, max_batch: int, budget_mb: float | None) -> CostEstimate:
    """The estimate at the largest batch size ≤ `max_batch` whose predicted peak fits `budget_mb`
    (None: no budget, `max_batch`). Raises DoesNotFit, naming the figures, when none does."""
    if budget_mb is None:
        return estimate(profile, plan, max_batch)
    for batch in range(max_batch, MIN_BATCH - 1, -1):
        chosen = estimate(profile, plan, batch)
        if chosen.peak_mb <= budget_mb:
            return chosen
    smallest = estimate(profile, plan, MIN_BATCH)
    if smallest.prune_peak_mb > max(smallest.train_peak_mb, smallest.eval_peak_mb):
        raise DoesNotFit(f"predicted peak {smallest.prune_peak_mb:.0f} MiB of the prune (the dependency graph and the "
                         f"bisection's copies) is over cycle_memory_budget_mb={budget_mb:g} even at the smallest batch size "
                         f"({MIN_BATCH})", smallest)
    if smallest.eval_peak_mb > smallest.train_peak_mb:
        raise DoesNotFit(f"predicted peak {smallest.eval_peak_mb:.0f} MiB of the held-out evaluation (batch {profile.eval_batch}) "
                         f"is over cycle_memory_budget_mb={budget_mb:g} even at the smallest batch size ({MIN_BATCH})", smallest)
    raise DoesNotFit(f"predicted peak {smallest.train_peak_mb:.0f} MiB at the smallest batch size ({MIN_BATCH}) "
                     f"is over cycle_memory_budget_mb={budget_mb:g}", smallest)


def profile_batches(batch_size: int) -> tuple[int, int]:
    """The batch sizes profiled for a cycle configured at `batch_size`: a quarter and a half of it (at
    least 2 and 4). Smaller ones cost less but extrapolate further: per-sample step time grows once
    the activations outgrow the caches, which tiny batches do not show."""
    low = max(MIN_BATCH, batch_size // 4)
    return low, max(2 * MIN_BATCH, batch_size // 2, low + 2)
