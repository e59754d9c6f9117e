"""The options of a prune-retrain cycle, checked in one place: the CLI, the daemon's config, its
API and the demo all call these, so a level or criterion list is valid everywhere or nowhere."""
from __future__ import annotations

import sys
from enum import Enum
from typing import Literal, Tuple, Union, cast

from .choices import parse_choices

AUTO = "auto"
# The built-in criteria (prune_core.criteria registers exactly these) and the allocations: known
# here, without torch, so the daemon's settings and API check a cycle's options without loading it.
BUILTIN_CRITERIA = ("activation", "apoz", "l1", "random", "taylor")
ALLOCATIONS = ("uniform", "global")
Allocation = Literal["uniform", "global"]
Level = Union[float, str]  # a fraction of parameters to remove, or "auto" (the level search)


# The share of the weight layers, at the end, that the last-stages scopes (last, last_bn) train:
# the default of TrainConfig, the CLI and the daemon's cycle_retrain_last_share (bench/RESULTS.md).
DEFAULT_LAST_SHARE = 0.4
# The share of a cycle's held-out samples kept to judge its candidate only (data.split_judging): the
# default of the daemon's cycle_judge_share.
DEFAULT_JUDGE_SHARE = 0.5
# A label-free level="auto" walks gradual prune-and-distil steps up to this share of the parameters
# removed, keeping the last step close enough to the teacher (prune_core.cycle).
DEFAULT_MAX_AUTO_LEVEL = 0.75
# The steps of that walk, and the default of the daemon's cycle_prune_steps.
DEFAULT_PRUNE_STEPS = 4


class Recipe(str, Enum):
    """How a cycle retrains: `patient` (prune_core.retrain.patient: consistent mixed views, AdamW, cosine, a
    time budget) or `classic` (SGD one-cycle with early stopping, `epochs` long)."""

    PATIENT = "patient"
    CLASSIC = "classic"

    def __str__(self) -> str:
        return self.value


def parse_last_share(value: Union[str, float]) -> float:
    """A last-stages share: a fraction in (0, 1] (1 trains every weight layer)."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"last_share must be a fraction in (0, 1], got '{value}'") from None
    if not 0.0 < share <= 1.0:
        raise ValueError(f"last_share must be a fraction in (0, 1], got {share:g}")
    return share


class RetrainScope(str, Enum):
    """Which parameters a (re)training run updates; the rest are frozen (prune_core.scope says how).

    full: every parameter (the most accurate, the most memory and time).
    last: only the last stages (a share of the weight layers at the end, `TrainConfig.last_share`);
        the frozen front runs without a graph, so its activations are never kept for backward, and
        where the model's forward splits there, in micro-batches (prune_core.front).
    last_bn: the last stages and every normalisation layer's affine parameters: cheap parameters
        that re-centre the pruned front's features, but the front needs a graph again.
    bias: every bias, every normalisation layer's affine parameters and the classifier (TinyTL's
        bias-only update): no weight gradients to compute or store, but a graph through the whole network.
    """

    FULL = "full"
    LAST = "last"
    LAST_BN = "last_bn"
    BIAS = "bias"

    def __str__(self) -> str:
        return self.value


def parse_scope(value: object) -> RetrainScope:
    """A RetrainScope from itself or its name; ValueError naming the choices otherwise."""
    try:
        return RetrainScope(value)
    except ValueError:
        raise ValueError(f"retrain scope must be one of {', '.join(s.value for s in RetrainScope)}, got {value!r}") from None


def parse_level(value: object) -> Level:
    """'auto', or a fraction strictly between 0 and 1 (a number or its text); ValueError otherwise."""
    if value == AUTO:
        return AUTO
    try:
        level = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"level must be 'auto' or a fraction between 0 and 1, got {value!r}") from None
    if not 0 < level < 1:
        raise ValueError(f"level must be 'auto' or a fraction between 0 and 1, got {value!r}")
    return level


def parse_criteria(text: str) -> tuple[str, ...]:
    """'taylor', or 'activation,apoz,taylor' for a cycle that tries each and keeps the model best on the
    held-out split (per-subset differences between criteria are often larger than their mean differences).
    Registered criteria only: the built-in ones, and any registered since prune_core.criteria was loaded."""
    criteria = sys.modules.get(f"{__package__}.criteria")
    known = sorted(criteria.CRITERIA) if criteria is not None else sorted(BUILTIN_CRITERIA)
    return parse_choices(text, known, "criterion")


def parse_allocations(text: str) -> tuple[Allocation, ...]:
    """'uniform', 'global', or 'uniform,global' for a cycle that tries both and keeps the model best on the
    held-out split: which one wins is a property of the network at its input size (bench/RESULTS.md)."""
    return cast(Tuple[Allocation, ...], parse_choices(text, ALLOCATIONS, "allocation", plural="both"))  # checked against ALLOCATIONS


def check_cycle_options(level: object, criterion: str, allocation: str) -> Level:
    """Raise ValueError naming the first bad option; return the parsed level."""
    parsed = parse_level(level)
    parse_criteria(criterion)
    parse_allocations(allocation)
    return parsed
