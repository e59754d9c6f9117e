"""The scheduler: one cycle at a time, started when the gate opens, supervised while it runs.

It polls telemetry, evaluates the gate, launches the worker process, pauses/resumes/aborts it
through the shared control value, enforces time limits, and on an accepted result commits the
candidate as a new version, loads and warms it, swaps it in and moves the active pointer.
Cycle records are JSON files under `cycles/<id>/cycle.json`, rewritten atomically on each change.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import queue
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prune_core.model_format import ModelFormatError, atomic_write

from .buffer import SampleBuffer
from .config import Settings
from .gate import Gate, GateState
from .metrics import Metrics
from .model_store import ModelStore
from .report import write_report_async
from .serving import ModelHolder, Served, load_served
from .telemetry import Provider, Reading
from .worker import ABORT, PAUSE, RUN, CycleJob, run_worker

log = logging.getLogger("edgetune.scheduler")
FINAL_STATES = ("accepted", "rejected", "failed", "aborted")
STATES = ("queued", "waiting", "running", "paused") + FINAL_STATES


class Conflict(RuntimeError):
    """A cycle is already queued or running."""


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (they are not valid JSON)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class CycleRecord:
    id: str
    state: str
    created: float
    request: dict
    forced: bool = False
    trigger: str = "api"
    reason: str | None = None
    started: float | None = None
    finished: float | None = None
    step: str | None = None
    progress: dict = field(default_factory=dict)
    probes: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    max_sample_id: int | None = None
    version_before: str | None = None
    version_after: str | None = None
    paused_seconds: float = 0.0

    def to_dict(self) -> dict:
        return _clean(asdict(self))


class CycleHistory:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob("*/.*.tmp"):  # a record or report write cut short by a crash
                leftover.unlink()
        except OSError as exc:
            log.warning("cycle history %s is not writable: %s", self.dir, exc)

    def save(self, record: CycleRecord) -> None:
        """Replace the record's file atomically. A full or read-only disk is logged, not raised:
        the record lives on in memory (and the API), and the next save that fits writes it."""
        folder = self.dir / record.id
        body = json.dumps(record.to_dict(), indent=2)
        try:
            folder.mkdir(exist_ok=True)
            atomic_write(folder / "cycle.json", lambda tmp: Path(tmp).write_text(body))
        except OSError as exc:
            log.warning("cycle %s: record not saved: %s", record.id, exc)

    def load_all(self) -> list[CycleRecord]:
        records = []
        for path in self.dir.glob("*/cycle.json"):
            try:
                data = json.loads(path.read_text())
                records.append(CycleRecord(**data))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable cycle record %s: %s", path, exc)
        return sorted(records, key=lambda r: r.created)


class Scheduler:
    def __init__(
        self, settings: Settings, buffer: SampleBuffer, store: ModelStore, holder: ModelHolder,
        gate: Gate, provider: Provider, metrics: Metrics, device,
    ):
        self.s = settings
        self.buffer = buffer
        self.store = store
        self.holder = holder
        self.gate = gate
        self.provider = provider
        self.metrics = metrics
        self.device = device
        self.history = CycleHistory(settings.cycles_dir)
        self.records: dict[str, CycleRecord] = {r.id: r for r in self.history.load_all()}
        self.current: CycleRecord | None = None
        self.reading = Reading()
        self.gate_state = GateState(reasons=["starting"])
        self._lock = threading.RLock()
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = None
        self._control = None
        self._events = None
        self._staging: Path | None = None
        self._paused_at: float | None = None
        self._final_event: dict = {}  # the worker's last event, evidence for the cycle report
        self._recover_interrupted()

    # ---- lifecycle ----------------------------------------------------------------------
    def _recover_interrupted(self) -> None:
        """Settle cycles the daemon died in. One that died while installing an accepted model
        whose directory was already committed is completed (that version is activated);
        every other is marked failed with the state it was in."""
        for record in self.records.values():
            if record.state in FINAL_STATES:
                continue
            record.finished = time.time()
            version = record.version_after
            if version is not None and version in self.store.versions():
                try:
                    self.activate(version)
                    record.state = "accepted"
                    record.reason = f"{record.reason or 'accepted'}; the daemon stopped during the install, completed on restart"
                    self.history.save(record)
                    log.warning("cycle %s: install of %s completed after a restart", record.id, version)
                    continue
                except (ModelFormatError, OSError, RuntimeError) as exc:
                    log.error("cycle %s: committed version %s does not load: %s", record.id, version, exc)
                    self._discard(version)
            step = f" ({record.step})" if record.step else ""
            record.reason = f"interrupted: the daemon stopped while the cycle was {record.state}{step}"
            record.state, record.version_after = "failed", None
            self.history.save(record)

    def _discard(self, version: str) -> None:
        """Remove a committed but never accepted version (unless it is the active one)."""
        try:
            if self.store.active() != version:
                self.store.remove(version)
        except OSError as exc:
            log.warning("could not remove unaccepted version %s: %s", version, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.current is not None and self.current.state not in FINAL_STATES:
                self._kill_worker()
                self._finish(self.current, "aborted", "the daemon is shutting down")

    # ---- requests -----------------------------------------------------------------------
    def request(self, level: Any, criterion: str, allocation: str, epochs: int, force: bool, trigger: str = "api") -> CycleRecord:
        with self._lock:
            if self.current is not None and self.current.state not in FINAL_STATES:
                raise Conflict(f"cycle {self.current.id} is {self.current.state}")
            record = CycleRecord(
                id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
                state="queued", created=time.time(), forced=force, trigger=trigger,
                request={"level": level, "criterion": criterion, "allocation": allocation, "epochs": epochs, "force": force},
            )
            self.records[record.id] = record
            self.current = record
            self.history.save(record)
            return record

    def activate(self, version: str) -> Served:
        """Load, warm up and swap in a stored version (rollback or roll forward)."""
        with self._swap_lock:
            served = load_served(version, self.store.path(version), self.device)
            self.holder.swap(served)
            self.store.set_active(version)
            self.metrics.swaps.inc()
            self.metrics.set_model(served.version, served.card.arch, served.params, served.macs)
            return served

    # ---- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive any one bad poll
                log.exception("scheduler tick failed")
            self._stop.wait(self.s.poll_interval_s)

    def tick(self) -> None:
        try:
            reading = self.provider.read()
        except Exception as exc:
            log.warning("telemetry read failed: %s", exc)
            reading = Reading()
        stats = self.buffer.stats()
        gate = self.gate.evaluate(reading, stats["samples"], stats["per_class"])
        self.reading, self.gate_state = reading, gate
        self._update_metrics(reading, gate, stats)
        with self._lock:
            current = self.current
            if current is None or current.state in FINAL_STATES:
                self._maybe_periodic(gate, stats)
            elif current.state in ("queued", "waiting"):
                ready = gate.hard_ok if current.forced else gate.open
                if ready:
                    self._launch(current, stats)
                else:
                    current.state, current.reason = "waiting", "; ".join(gate.reasons)
                    self.history.save(current)
            else:
                self._supervise(current, gate)

    def backoff(self) -> tuple[int, float | None]:
        """(consecutive failed cycles, time before which no automatic cycle starts). The delay
        doubles with each failure in a row, from cycle_backoff_base_s up to cycle_backoff_max_s;
        an accepted or rejected cycle ends the streak. Records persist, so restarts keep it."""
        streak, last = 0, None
        for r in sorted(self.records.values(), key=lambda r: r.created, reverse=True):
            if r.state not in FINAL_STATES or r.state == "aborted":  # aborts are the gate's doing
                continue
            if r.state != "failed":
                break
            streak += 1
            last = last or r.finished
        if not streak:
            return 0, None
        delay = min(self.s.cycle_backoff_max_s, self.s.cycle_backoff_base_s * 2 ** (streak - 1))
        return streak, (last or time.time()) + delay

    def _maybe_periodic(self, gate: GateState, stats: dict) -> None:
        if not self.s.auto_cycles or not gate.open:
            return
        _, not_before = self.backoff()
        if not_before is not None and time.time() < not_before:
            return
        last = max((r.max_sample_id or 0 for r in self.records.values()), default=0)
        if stats["last_id"] - last >= self.s.new_samples_per_cycle:
            s = self.s
            self.request(s.cycle_level, s.cycle_criterion, s.cycle_allocation, s.cycle_epochs, force=False, trigger="periodic")

    def _launch(self, record: CycleRecord, stats: dict) -> None:
        served = self.holder.current
        if served is None:
            self._finish(record, "failed", "no model is being served")
            return
        try:
            self._staging = self.store.staging_dir()
        except OSError as exc:
            self._finish(record, "failed", f"cannot write to the state directory: {exc}")
            return
        req = record.request
        job = CycleJob(
            cycle_id=record.id, buffer_path=str(self.buffer.path), model_dir=str(self.store.path(served.version)),
            served_version=served.version, staging_dir=str(self._staging), max_sample_id=stats["last_id"],
            level=req["level"], criterion=req["criterion"], allocation=req["allocation"], epochs=req["epochs"],
            finetune_before=self.s.cycle_finetune_before, tolerance=self.s.cycle_tolerance,
            batch_size=self.s.cycle_batch_size, min_steps=self.s.cycle_min_steps, hflip=self.s.cycle_hflip, max_accuracy_drop=self.s.max_accuracy_drop,
            min_size_gain=self.s.min_size_gain, device=self.s.device, nice=self.s.worker_nice,
            memory_limit_mb=self.s.cycle_memory_limit_mb,
        )
        ctx = mp.get_context("spawn")
        self._control = ctx.Value("i", RUN)
        self._events = ctx.Queue()
        self._proc = ctx.Process(target=run_worker, args=(asdict(job), self._control, self._events), name=f"cycle-{record.id}", daemon=True)
        self._proc.start()
        record.state, record.reason, record.started = "running", None, time.time()
        record.max_sample_id, record.version_before = stats["last_id"], served.version
        self._paused_at = None
        self.history.save(record)
        log.info("cycle %s started on %s (%d samples)", record.id, served.version, stats["samples"])

    def _drain(self, record: CycleRecord) -> dict | None:
        """Apply the worker's events to the record; return its final event, if any."""
        final = None
        while True:
            try:
                event = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return final
            kind = event.get("type")
            if kind == "step":
                record.step = event["step"]
                record.progress = {k: v for k, v in event.items() if k not in ("type", "step", "time")} or record.progress
            elif kind == "progress":
                record.progress = {k: v for k, v in event.items() if k != "type"}
            elif kind == "probe":
                record.probes.append({k: v for k, v in event.items() if k not in ("type", "time")})
            elif kind in ("result", "failed", "aborted"):
                final = event

    def _supervise(self, record: CycleRecord, gate: GateState) -> None:
        final = self._drain(record)
        if final is not None:
            self._conclude(record, final)
            return
        now = time.time()
        if self._proc is not None and not self._proc.is_alive():
            time.sleep(0.2)  # let the last events arrive
            final = self._drain(record)
            if final is not None:
                self._conclude(record, final)
            else:
                self._finish(record, "failed", f"worker exited with code {self._proc.exitcode} (killed or out of memory)")
            return
        running_for = now - (record.started or now) - record.paused_seconds
        if running_for > self.s.cycle_timeout_s:
            self._kill_worker()
            self._finish(record, "failed", f"exceeded cycle_timeout_s ({self.s.cycle_timeout_s:g}s)")
            return
        allowed = gate.hard_ok if record.forced else gate.may_continue
        if not allowed and record.state == "running":
            self._control.value = PAUSE
            self._paused_at = now
            record.state, record.reason = "paused", "; ".join(gate.reasons)
            self.history.save(record)
        elif record.state == "paused":
            if allowed:
                self._control.value = RUN
                record.paused_seconds += now - (self._paused_at or now)
                self._paused_at = None
                record.state, record.reason = "running", None
            elif now - (self._paused_at or now) > self.s.pause_timeout_s:
                self._control.value = ABORT
                self._kill_worker(grace=5)
                self._finish(record, "aborted", f"paused longer than pause_timeout_s ({self.s.pause_timeout_s:g}s): {'; '.join(gate.reasons)}")
                return
            else:
                record.reason = "; ".join(gate.reasons)
        self.history.save(record)

    def _conclude(self, record: CycleRecord, event: dict) -> None:
        self._final_event = event
        self._kill_worker(grace=10)
        if event["type"] != "result":
            self._finish(record, "aborted" if event["type"] == "aborted" else "failed", event.get("reason"))
            return
        record.metrics = event.get("summary", {})
        if not event["accepted"]:
            self._finish(record, "rejected", event["reason"])
            return
        # The version name is recorded before the commit: a restart then knows whether the
        # rename happened (complete the install) or not (the staging dir is discarded).
        version, committed = self.store.next_version(), False
        record.step, record.reason, record.version_after = "install", event["reason"], version
        self.history.save(record)
        try:
            with self._swap_lock:
                previous = self.holder.current
                self.store.commit(self._staging, version)
                self._staging, committed = None, True
                served = load_served(version, self.store.path(version), self.device)
                self.holder.swap(served)
                self.store.set_active(version)
        except Exception as exc:
            if committed:
                self._discard(version)
            record.version_after = None
            self._finish(record, "failed", f"could not install the new model: {type(exc).__name__}: {exc}")
            return
        self.store.remove_stale(protect={version, previous.version if previous else ""})
        self.metrics.swaps.inc()
        self.metrics.set_model(served.version, served.card.arch, served.params, served.macs)
        self._finish(record, "accepted", event["reason"])
        log.info("cycle %s accepted: now serving %s", record.id, version)

    def _kill_worker(self, grace: float = 0.0) -> None:
        proc = self._proc
        if proc is not None:
            proc.join(timeout=grace)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._proc = None

    def _finish(self, record: CycleRecord, state: str, reason: str | None) -> None:
        if self._proc is not None:
            self._kill_worker()
        if self._staging is not None:  # an unaccepted candidate is never kept
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._paused_at is not None:
            record.paused_seconds += time.time() - self._paused_at
            self._paused_at = None
        record.state, record.reason, record.finished = state, reason, time.time()
        # Metrics first: whoever sees the finished record must also see it counted.
        self.metrics.cycles.labels(outcome=state).inc()
        if record.started:
            self.metrics.cycle_duration.observe(record.finished - record.started)
        self.history.save(record)
        write_report_async(self.history.dir / record.id, record.to_dict(), self._final_event)
        self._final_event = {}
        log.info("cycle %s %s: %s", record.id, state, reason)

    # ---- reporting ----------------------------------------------------------------------
    def _update_metrics(self, reading: Reading, gate: GateState, stats: dict) -> None:
        m = self.metrics
        for zone, temp in reading.temperatures_c.items():
            m.temperature.labels(zone=zone).set(temp)
        m.temperature_max.set(reading.max_temperature_c if reading.max_temperature_c is not None else float("nan"))
        m.thermal_limit.set(self.s.thermal_limit_c)
        m.power.set(reading.power_w if reading.power_w is not None else float("nan"))
        budget = self.gate.power_budget(reading)
        m.power_budget.set(budget if budget is not None else float("nan"))
        for unit, value in (("cpu", reading.cpu_load), ("gpu", reading.gpu_load), ("memory", reading.memory_used)):
            if value is not None:
                m.load.labels(unit=unit).set(value)
        m.gate_open.set(1 if gate.open else 0)
        for cond in ("idle", "load_ok", "thermal_ok", "power_ok", "samples_ok"):
            m.gate_condition.labels(condition=cond).set(1 if getattr(gate, cond) else 0)
        m.buffer_samples.set(stats["samples"])
        m.buffer_labelled.set(stats["labelled"])
        m.buffer_bytes.set(stats["bytes"])
        m.buffer_max_bytes.set(stats["max_bytes"])
        m.buffer_max_samples.set(stats["max_rows"])
        state = self.current.state if self.current else None
        m.cycle_running.set({"running": 1, "paused": 2}.get(state, 0))

    def status(self) -> dict:
        current = self.current
        state = current.state if current and current.state not in FINAL_STATES else "idle"
        g = self.gate_state
        failures, not_before = self.backoff()
        if not_before is not None and not_before <= time.time():
            not_before = None
        return {
            "state": state,
            "gate_open": g.open,
            "idle": g.idle,
            "load_ok": g.load_ok,
            "thermal_ok": g.thermal_ok,
            "power_ok": g.power_ok,
            "power_budget_w": self.gate.power_budget(self.reading),  # the current power mode's, if configured
            "samples_ok": g.samples_ok,
            "why_not_running": (g.reasons if state in ("idle", "waiting", "paused") else []) + (
                [f"{failures} failed cycles in a row: next automatic cycle not before "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(not_before))}"] if not_before and state == "idle" else []),
            "seconds_since_inference": self.gate.seconds_since_request(),
            "request_rate_per_s": self.gate.request_rate(),
            "auto_cycles": self.s.auto_cycles,
            "consecutive_failures": failures,
            "next_automatic_cycle_not_before": not_before,
        }
