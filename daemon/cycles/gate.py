"""The gate: may a prune-retrain cycle start (or keep running) now?

Hard limits (never skipped, not even by a forced cycle): temperature below the thermal limit,
with hysteresis after a trip, and power within the budget. Soft conditions: the device is idle
(no inference for `idle_seconds`, or a request rate under `max_request_rate`), CPU/GPU load low,
and the buffer holds enough samples.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass, field

from ..ops.config import Settings
from ..ops.telemetry import Reading


@dataclass
class GateState:
    open: bool = False  # a cycle may start
    may_continue: bool = False  # a running cycle may continue (idle + hard limits)
    hard_ok: bool = False  # thermal and power limits hold
    idle: bool = False
    load_ok: bool = False
    thermal_ok: bool = False
    power_ok: bool = False
    samples_ok: bool = False
    reasons: list[str] = field(default_factory=list)  # why it is closed

    def to_dict(self) -> dict:
        return asdict(self)


class Gate:
    def __init__(self, settings: Settings):
        self.s = settings
        self._last_request = 0.0  # monotonic time of the last inference; 0 = none since start
        self._requests: collections.deque[float] = collections.deque()
        self._tripped = False
        self._lock = threading.Lock()

    def note_request(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_request = now
            self._requests.append(now)
            while self._requests and self._requests[0] < now - 60:
                self._requests.popleft()

    def seconds_since_request(self) -> float | None:
        return time.monotonic() - self._last_request if self._last_request else None

    def request_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._requests and self._requests[0] < now - 60:
                self._requests.popleft()
            return len(self._requests) / 60.0

    def power_budget(self, reading: Reading) -> float | None:
        if reading.power_mode and reading.power_mode in self.s.power_budget_by_mode:
            return self.s.power_budget_by_mode[reading.power_mode]
        return self.s.power_budget_w

    def evaluate(self, reading: Reading, samples: int, per_class: dict) -> GateState:
        s, g = self.s, GateState()
        since = self.seconds_since_request()
        g.idle = since is None or since >= s.idle_seconds or (s.max_request_rate > 0 and self.request_rate() <= s.max_request_rate)
        if not g.idle:
            g.reasons.append(f"busy: last inference {since:.1f}s ago (idle after {s.idle_seconds:g}s)")

        temp = reading.max_temperature_c
        if temp is not None:
            if temp >= s.thermal_limit_c:
                self._tripped = True
            elif temp < s.thermal_limit_c - s.thermal_hysteresis_c:
                self._tripped = False
        g.thermal_ok = not self._tripped
        if not g.thermal_ok:
            g.reasons.append(
                f"too hot: {temp:.1f}°C (limit {s.thermal_limit_c:g}°C, resumes below {s.thermal_limit_c - s.thermal_hysteresis_c:g}°C)"
            )

        budget = self.power_budget(reading)
        g.power_ok = budget is None or reading.power_w is None or reading.power_w <= budget
        if not g.power_ok:
            g.reasons.append(f"over power budget: {reading.power_w:.1f} W > {budget:g} W")

        cpu_ok = reading.cpu_load is None or reading.cpu_load <= s.max_cpu_load
        gpu_ok = reading.gpu_load is None or reading.gpu_load <= s.max_gpu_load
        g.load_ok = cpu_ok and gpu_ok
        if not cpu_ok:
            g.reasons.append(f"CPU busy: {reading.cpu_load:.0f}% > {s.max_cpu_load:g}%")
        if not gpu_ok:
            g.reasons.append(f"GPU busy: {reading.gpu_load:.0f}% > {s.max_gpu_load:g}%")

        seen = [n for n in per_class.values() if n > 0]
        g.samples_ok = samples >= s.min_samples and (not seen or min(seen) >= s.min_per_class)
        if samples < s.min_samples:
            g.reasons.append(f"not enough samples: {samples} < {s.min_samples}")
        elif not g.samples_ok:
            g.reasons.append(f"a class has fewer than {s.min_per_class} samples")

        g.hard_ok = g.thermal_ok and g.power_ok
        g.may_continue = g.hard_ok and g.idle
        g.open = g.may_continue and g.load_ok and g.samples_ok
        return g
