"""Progress lines on stderr, and the --max-minutes deadline checked after every row."""
from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class OutOfTime(Exception):
    """--max-minutes has passed: no new row is started; the report covers the rows done."""


class Progress:
    def __init__(self, total: int, max_minutes: float | None = None):
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.deadline = self.started + 60 * max_minutes if max_minutes else None

    def step(self, what: str) -> None:
        self.done += 1
        spent = time.monotonic() - self.started
        eta = spent / self.done * (self.total - self.done) if self.done else 0.0
        log(f"[{self.done}/{self.total}] {what}  (elapsed {spent / 60:.1f} min, eta {eta / 60:.1f} min)")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(f"--max-minutes reached after {self.done} of {self.total} rows; rerun with the same --out to resume")
