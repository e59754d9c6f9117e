"""Backoff of automatic cycles after failures: the wait doubles with each failed cycle in a row.

A pure function of the records and the time, so it is tested without a clock and survives restarts
(records persist)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .cycle_records import CycleRecord
from .cycle_state import CycleState


@dataclass(frozen=True)
class Backoff:
    failures: int  # failed cycles in a row, newest first
    not_before: float | None  # no automatic cycle starts before this time; None: no backoff

    def holds(self, now: float) -> bool:
        """True while an automatic cycle must still wait."""
        return self.not_before is not None and now < self.not_before


def backoff(records: Iterable[CycleRecord], now: float, base_s: float, max_s: float) -> Backoff:
    """Count the failed cycles since the last accepted or rejected one (aborts are the gate's doing
    and unfinished cycles do not count either way); the wait after the newest failure is
    `base_s * 2**(failures - 1)`, at most `max_s`."""
    failures, last = 0, None
    for r in sorted(records, key=lambda r: r.created, reverse=True):
        if not r.state.final or r.state is CycleState.ABORTED:
            continue
        if r.state is not CycleState.FAILED:
            break
        failures += 1
        last = last or r.finished
    if not failures:
        return Backoff(0, None)
    delay = min(max_s, base_s * 2 ** (failures - 1))
    return Backoff(failures, (last or now) + delay)
