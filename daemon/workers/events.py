"""What the cycle worker tells the daemon, as typed (and picklable) events on a queue.

A cycle ends with exactly one final event: ResultEvent, FailedEvent or AbortedEvent. Final events
carry the evidence for the cycle report (the loss curve; the channels kept, for a result)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Union

from prune_core.cost_records import CostEstimate, MeasuredCost
from prune_core.evidence import JudgingEvidence


@dataclass(frozen=True)
class StepEvent:
    """The worker entered a step (start, snapshot, rank, validate, write); `details` describe it."""

    step: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProgressEvent:
    """One training batch done."""

    epoch: int
    batch: int
    batches_per_epoch: int
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProbeEvent:
    """One pruning level tried (prune_core's Probe, as a dict)."""

    probe: dict


@dataclass(frozen=True)
class CostPredictedEvent:
    """The cycle's predicted cost at the batch size it will use (None where it could not be measured),
    the memory budget it was chosen for, and a note (a smaller batch, a refusal, why no prediction)."""

    estimate: CostEstimate | None
    budget_mb: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {"predicted": self.estimate.to_dict() if self.estimate else None, "budget_mb": self.budget_mb, "note": self.note}


@dataclass(frozen=True)
class CostMeasuredEvent:
    """The cycle's actual peak memory and duration, over the span the prediction covers."""

    actual: MeasuredCost


@dataclass(frozen=True)
class ResultEvent:
    accepted: bool
    reason: str
    summary: dict
    seconds: float
    curve: list = field(default_factory=list)
    channels: list = field(default_factory=list)
    engines: list = field(default_factory=list)  # daemon.engines.BuildOutcome per backend built for an accepted candidate
    pending: bool = False  # neither accepted nor rejected: the candidate waits in staging for labels of its disagreements
    evidence: JudgingEvidence | None = None  # the paired evidence it was judged on


@dataclass(frozen=True)
class FailedEvent:
    reason: str
    traceback: str = ""
    curve: list = field(default_factory=list)


@dataclass(frozen=True)
class AbortedEvent:
    reason: str
    curve: list = field(default_factory=list)


FinalEvent = Union[ResultEvent, FailedEvent, AbortedEvent]
WorkerEvent = Union[StepEvent, ProgressEvent, ProbeEvent, CostPredictedEvent, CostMeasuredEvent, ResultEvent, FailedEvent, AbortedEvent]
FINAL_EVENTS = (ResultEvent, FailedEvent, AbortedEvent)


def evidence(event: FinalEvent | None) -> dict:
    """What the cycle report takes from a final event (empty when the worker sent none)."""
    return asdict(event) if event is not None else {}
