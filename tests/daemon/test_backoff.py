"""Backoff of automatic cycles: a pure function of the records and `now`, tested without a clock."""
from __future__ import annotations

from daemon.cycles.backoff import Backoff, backoff
from daemon.cycles.cycle_records import CycleRecord
from daemon.cycles.cycle_state import CycleState

BASE, MAX = 60.0, 3600.0


def records(*states: str) -> list[CycleRecord]:
    """Cycles created 1000 s apart, oldest first, each finished 10 s after it was created."""
    return [CycleRecord(id=f"c{i}", state=s, created=1000.0 * i, request={},
                        finished=1000.0 * i + 10 if CycleState(s).final else None) for i, s in enumerate(states)]


def test_no_failures_no_backoff():
    assert backoff([], now=5.0, base_s=BASE, max_s=MAX) == Backoff(0, None)
    assert backoff(records("failed", "accepted"), now=5.0, base_s=BASE, max_s=MAX) == Backoff(0, None)
    assert backoff(records("failed", "rejected"), now=5.0, base_s=BASE, max_s=MAX) == Backoff(0, None)


def test_the_wait_doubles_per_failure_in_a_row_up_to_the_cap():
    for n, wait in ((1, 60), (2, 120), (3, 240), (4, 480), (6, 1920), (7, 3600), (12, 3600)):
        rs = records("accepted", *["failed"] * n)
        got = backoff(rs, now=0.0, base_s=BASE, max_s=MAX)
        assert got == Backoff(n, rs[-1].finished + wait), n


def test_aborts_and_active_cycles_neither_count_nor_break_the_streak():
    rs = records("rejected", "failed", "aborted", "failed", "running")
    got = backoff(rs, now=0.0, base_s=BASE, max_s=MAX)
    assert got == Backoff(2, rs[3].finished + 120)


def test_holds_until_not_before():
    got = backoff(records("failed"), now=0.0, base_s=BASE, max_s=MAX)
    assert got.not_before == 70.0
    assert got.holds(69.9) and not got.holds(70.0)
    assert not Backoff(0, None).holds(0.0)


def test_a_failure_without_a_finish_time_waits_from_now():
    rs = [CycleRecord(id="x", state="failed", created=1.0, request={})]
    assert backoff(rs, now=500.0, base_s=BASE, max_s=MAX) == Backoff(1, 560.0)
