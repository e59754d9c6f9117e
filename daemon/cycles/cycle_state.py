"""The states a cycle goes through, and what started it, shared by the supervisor, the API, the status
CLI and the demo.

A `str` enum: records and API responses carry the plain value ("running"), so JSON and older
records on disk are unchanged."""
from __future__ import annotations

from enum import Enum


class CycleState(str, Enum):
    QUEUED = "queued"  # requested, not yet checked against the gate
    WAITING = "waiting"  # the gate is closed; starts when it opens
    RUNNING = "running"
    PAUSED = "paused"  # the gate closed while running; resumes or is aborted after pause_timeout_s
    PENDING = "pending"  # the candidate waits in staging for labels of its disagreements; accepted, rejected or timed out
    ACCEPTED = "accepted"  # the candidate was installed and is served
    REJECTED = "rejected"  # the candidate did not pass validation; nothing changed
    FAILED = "failed"  # the worker crashed, timed out or the install failed
    ABORTED = "aborted"  # stopped by the gate, a shutdown or the user

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """Queued, waiting, running, paused or pending: another cycle may not start."""
        return not self.final


FINAL_STATES = frozenset({CycleState.ACCEPTED, CycleState.REJECTED, CycleState.FAILED, CycleState.ABORTED})


class CycleTrigger(str, Enum):
    """What started a cycle (CycleRecord.trigger); a `str` enum for the same reason as CycleState."""

    API = "api"  # POST /cycles
    PERIODIC = "periodic"  # the scheduler's own, once new_samples_per_cycle samples are buffered and the gate opens
    DRIFT = "drift"  # not a training cycle: the swap back to the generalist, recorded in the history

    def __str__(self) -> str:
        return self.value
