"""A cycle's cost before it runs: its peak memory and duration on this device, by a micro-profile.

As Ekya does, a few real training steps are run on the device itself, through `retrain.train` (so
the cycle's own step: forward, teacher, loss, backward, optimizer step, with its TrainConfig), at
two or more batch sizes, and lines are fitted:

    peak memory = fixed + per_sample × batch        step time = overhead + per_sample × batch

plus one timed evaluation pass (what it adds to the memory counts too: at a small training batch it
can be the larger peak). For a cycle (`profile_cycle`) a throwaway copy is also pruned at the cycle's
level (l1, the cycle's first allocation: the cheapest criterion, and the level fixes the size), the
prune and its MAC count are timed and what the prune adds to memory (the bisection's copies) measured,
and the pruned copy is profiled the same way: the probes' retraining and scoring are costed at the
pruned model's own step and evaluation times.

A cycle's duration is the sum of its phases (`Phases`), each a count of training steps, evaluated
images and prunes times the measured times. It is the longest path: no early stop, and under
level="auto" the most probes a binary search over the grid can take, each costed as the model pruned
to the grid's middle level (the first probe; the later ones go both ways from it).

Memory is what the process holds, measured where it is spent: on CPU the resident set's high-water
mark (Linux VmHWM, reset by writing 5 to /proc/self/clear_refs after trimming the heap); on CUDA the caching allocator's
max_memory_allocated. `fixed` therefore includes everything the process holds when profiled (the
libraries, the data, the models); the copies of the model a cycle keeps beside the training pair are
added per copy (`CyclePlan.extra_models`).

The records it produces, and the arithmetic from them to a prediction, are in prune_core.cost_records
(torch-free); torch is imported here inside the functions that measure.
"""
from __future__ import annotations

import copy
import math
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .cost_records import (  # the records, re-exported: `prune_core.cost` names the whole cost model
    MIN_BATCH,
    CostError,
    CostEstimate,
    CyclePlan,
    DoesNotFit,
    Line,
    MeasuredCost,
    MemorySource,
    Phase,
    PhaseClock,
    Phases,
    Profile,
    ProfileSample,
    estimate,
    fit_budget,
    profile_batches,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .cycle import CycleConfig
    from .data import ImageSet
    from .retrain import TrainConfig

EVAL_IMAGES = 256  # held-out images the profile evaluates (at the training batch size, as run_cycle does)
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def _trim_heap() -> None:
    """glibc: hand the heap's free pages back (malloc_trim). Without it the resident set keeps what earlier
    steps freed, and a peak measured from it misses what a later step adds on top of live memory."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMeter:
    """The peak memory of this process since the last reset: VmHWM on CPU, CUDA max allocated on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = MemorySource.CUDA if device.type == "cuda" else MemorySource.RSS

    def reset(self) -> None:
        if self.source is MemorySource.CUDA:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _trim_heap()  # so the mark starts at what is live, and what comes after is measured from there
        try:
            CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
        except OSError as exc:
            raise CostError(f"cannot reset the peak-memory mark ({CLEAR_REFS}: {exc})") from None

    def peak_mb(self) -> float:
        if self.source is MemorySource.CUDA:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            match = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.M)
        except OSError as exc:
            raise CostError(f"cannot read the peak-memory mark ({STATUS}: {exc})") from None
        if match is None:
            raise CostError(f"{STATUS} has no VmHWM line")
        return int(match.group(1)) / 1024


def saved_mb(model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> float:
    """MiB of the tensors autograd saves for the backward pass of one training step on (x, y) with
    `config.scope` in effect (a frozen front saves nothing), each storage counted once. Parameters are
    among them (constant in the batch: a slope drops them)."""
    import torch

    from .retrain import distillation_loss
    from .scope import Frozen, plan_scope

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    with torch.no_grad():
        t_logits = teacher(x) if teacher is not None else None
    frozen = Frozen(model, plan_scope(model, config.scope, config.last_share))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = distillation_loss(model(x), y, t_logits, config)
        del loss
    finally:
        frozen.release()
        model.train(was_training)
    return sum(seen.values()) / 2**20


def _stamper(stamps: list[float], clock: Callable[[], float]) -> Callable[[float], None]:
    """A train() on_step that records when each step ended."""
    return lambda _share: stamps.append(clock())


def model_mb(model: nn.Module) -> float:
    """One copy of the model's parameters and buffers, in MiB."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def profile(
    teacher: nn.Module,
    train_set: ImageSet,
    held_set: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    config: TrainConfig,
    batch_sizes: Sequence[int],
    steps: int = 5,
    clock: Callable[[], float] = time.perf_counter,
    student: nn.Module | None = None,
) -> Profile:
    """Run `steps` training steps of `student`, distilling from `teacher` as a cycle does, at each of
    `batch_sizes`, smallest first, after one held-out evaluation pass of it at the configured batch size
    (run_cycle and train evaluate at the training batch). `student`: a throwaway model, trained in place
    (default: a copy of `teacher`, which is not changed). `clock` times them (a benchmark on shared cores
    passes time.process_time)."""
    import torch

    from .data import batches
    from .measure import count_params, evaluate
    from .retrain import train

    if len(set(batch_sizes)) < 2:
        raise ValueError("profile at two or more batch sizes")
    if len(train_set) == 0 or len(held_set) == 0:
        raise ValueError("profiling needs training and held-out samples")
    started = time.monotonic()
    device = next(teacher.parameters()).device
    meter = PeakMeter(device)
    student = copy.deepcopy(teacher) if student is None else student
    # the evaluation first: in a cycle it comes first too, before training has grown the heap
    held = held_set.subset(torch.arange(min(EVAL_IMAGES, len(held_set))))
    eval_batch = config.batch_size
    meter.reset()
    held_before = meter.peak_mb()  # the mark starts at what the process holds now
    evaluate(student, batches(held, eval_batch, mean, std, device=device))  # warm-up, and the memory
    eval_extra = meter.peak_mb() - held_before
    t0 = clock()
    evaluate(student, batches(held, eval_batch, mean, std, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    eval_image_s = (clock() - t0) / len(held)
    samples = []
    for batch in sorted(set(batch_sizes)):
        part = train_set.subset(torch.arange(batch * steps) % len(train_set))
        stamps: list[float] = []
        meter.reset()
        t0 = clock()
        train(student, part, None, mean, std, replace(config, epochs=1, batch_size=batch, min_steps=0, budget_s=None), teacher=teacher,
              on_step=_stamper(stamps, clock))
        total = clock() - t0
        peak = meter.peak_mb()
        step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        x, y = next(iter(batches(part, batch, mean, std, device=device)))
        samples.append(ProfileSample(batch, peak, step_s, saved_mb(student, teacher, x, y, config), total - steps * step_s))
    size, params = model_mb(student), count_params(student)
    del student
    return Profile(tuple(samples), eval_batch, eval_extra, eval_image_s, size, meter.source, str(device), time.monotonic() - started,
                   config.scope.value, params)

def plan_cycle(config: CycleConfig, train_samples: int, held_samples: int, extra_models: int = 0,
               unlabelled: int = 0) -> CyclePlan:
    """The plan of `run_cycle(config)` on these sample counts (`unlabelled` of the training samples);
    `extra_models`: copies of the model its caller holds beyond run_cycle's own (the served model
    beside its prior-corrected twin)."""
    from .criteria import get_criterion, parse_criteria
    from .level_search import DEFAULT_GRID
    from .surgery import parse_allocations

    criteria = [get_criterion(name) for name in parse_criteria(config.criterion)]
    auto = config.level == "auto"
    return CyclePlan(
        train_samples=train_samples, held_samples=held_samples, epochs=config.train.epochs,
        min_steps=config.train.min_steps,
        finetune_epochs=config.finetune_before or (config.train.epochs if auto else 0),
        finetune_distils=False,  # cycle.adaptation: cross-entropy on labelled samples
        unlabelled_share=unlabelled / train_samples if train_samples else 0.0,
        fade_epochs=config.fade_epochs,
        probes=math.ceil(math.log2(len(DEFAULT_GRID) + 1)) if auto else 1,  # a binary search's deepest path
        tries=len(criteria) * len(parse_allocations(config.allocation)),
        forward_rankings=sum(c.data_aware and not c.backward for c in criteria),
        backward_rankings=sum(c.data_aware and c.backward for c in criteria),
        calibration_batches=config.calibration_batches,
        unpruned_evals=2 + (1 if auto else 0),  # and the ceiling's score
        # run_cycle's own copies: `base`, and the fine-tuned reference or the ceiling
        extra_models=extra_models + 1 + (1 if config.finetune_before or auto else 0),
        pruned_copies=1 if auto else 0,
        auto=auto,
    )


def profile_level(level: float | str) -> float:
    """The level a cycle's pruned copy is profiled at: the cycle's, or under "auto" the level search's
    first probe (the grid's middle)."""
    from .level_search import DEFAULT_GRID

    return DEFAULT_GRID[len(DEFAULT_GRID) // 2] if level == "auto" else float(level)


def profile_cycle(
    teacher: nn.Module,
    train_set: ImageSet,
    held_set: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    config: CycleConfig,
    input_size: int,
    batch_sizes: Sequence[int],
    steps: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> Profile:
    """`profile` of the unpruned model, and of a throwaway copy pruned (l1, the cycle's first allocation)
    at `profile_level(config.level)`, with that prune (its time and the memory it adds) and one MAC count
    of its result measured."""
    from .criteria import get_criterion
    from .measure import count_macs
    from .surgery import PruneSpec, parse_allocations, prune_to_level

    started = time.monotonic()
    unpruned = profile(teacher, train_set, held_set, mean, std, config.train, batch_sizes, steps, clock)
    level = profile_level(config.level)
    spec = PruneSpec(level, parse_allocations(config.allocation)[0], config.round_to, config.protect_stem,
                     config.protect_classifier, config.max_layer_ratio)
    l1 = get_criterion("l1")
    scores = l1.score(teacher)
    meter = PeakMeter(next(teacher.parameters()).device)
    meter.reset()
    held_before = meter.peak_mb()
    t0 = clock()
    copy_ = prune_to_level(teacher, scores, spec, input_size, l1.prefer_norm_layers).model
    t1 = clock()
    prune_extra = meter.peak_mb() - held_before
    count_macs(copy_, input_size)
    t2 = clock()
    pruned = profile(teacher, train_set, held_set, mean, std, config.train, batch_sizes, steps, clock, student=copy_)
    del copy_
    return replace(unpruned, pruned=pruned, level=level, prune_s=t1 - t0, macs_s=t2 - t1, prune_extra_mb=prune_extra,
                   seconds=time.monotonic() - started)


__all__ = [
    "MIN_BATCH", "CostError", "CostEstimate", "CyclePlan", "DoesNotFit", "Line", "MeasuredCost", "MemorySource", "PeakMeter",
    "Phase", "PhaseClock", "Phases", "Profile", "ProfileSample", "estimate", "fit_budget", "model_mb", "profile",
    "plan_cycle", "profile_batches", "profile_cycle", "profile_level",
]
