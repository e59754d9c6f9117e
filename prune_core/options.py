"""The options of a prune-retrain cycle, checked in one place: the CLI, the daemon's config, its
API and the demo all call these, so a level or criterion list is valid everywhere or nowhere."""
from __future__ import annotations

from enum import Enum
from typing import Union

AUTO = "auto"
Level = Union[float, str]  # a fraction of parameters to remove, or "auto" (the level search)


class RetrainScope(str, Enum):
    """Which parameters a (re)training run updates; the rest are frozen (prune_core.scope says how).

    full: every parameter (the most accurate, the most memory and time).
    last: only the last stages (a share of the weight layers at the end, `TrainConfig.last_share`);
        the frozen front runs without a graph, so its activations are never kept for backward.
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
    """The criterion names in a comma-separated list (registered ones only)."""
    from .criteria import parse_criteria as parse

    return parse(text)


def parse_allocations(text: str) -> tuple[str, ...]:
    """The allocation names in a comma-separated list (uniform, global)."""
    from .surgery import parse_allocations as parse

    return parse(text)


def check_cycle_options(level: object, criterion: str, allocation: str) -> Level:
    """Raise ValueError naming the first bad option; return the parsed level."""
    parsed = parse_level(level)
    parse_criteria(criterion)
    parse_allocations(allocation)
    return parsed
