"""The scheduler: one cycle at a time, started when the gate opens, supervised while it runs.

Each poll reads telemetry, evaluates the gate and decides: start a waiting cycle, pause, resume or
abort a running one, enforce its time limits, conclude it from the worker's final event (an
accepted candidate is handed to the installer), or request a periodic cycle. The records, the
worker process, the install and the backoff rule each live in their own module."""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from prune_core.evidence import JudgingEvidence

from .acceptance import Acceptance, Verdict, decide
from .backoff import Backoff, backoff
from ..storage.buffer import SampleBuffer
from ..ops.config import Settings
from .cycle_records import CycleRecord, CycleStore
from .cycle_state import CycleState
from ..engines import backends_to_build
from ..workers.events import FINAL_EVENTS, CostMeasuredEvent, CostPredictedEvent, FailedEvent, FinalEvent, ProbeEvent, ProgressEvent, ResultEvent, StepEvent, WorkerEvent, evidence
from .gate import Gate, GateState
from ..serving.installer import Installer
from ..ops.metrics import Metrics
from .report import write_report_async
from ..serving.serving import Served
from ..workers.supervisor import WorkerSupervisor
from ..ops.telemetry import Provider, Reading
from ..workers.worker import CycleJob

log = logging.getLogger("edgetune.scheduler")
Clock = Callable[[], float]


class Conflict(RuntimeError):
    """A cycle is already queued or running."""


@dataclass(frozen=True)
class SchedulerView:
    """What the scheduler knows after its last poll (for /status and the service's STATUS line)."""

    current: CycleRecord | None  # the latest cycle requested since start-up, finished or not
    gate: GateState
    reading: Reading
    backoff: Backoff


class Scheduler:
    def __init__(
        self, settings: Settings, buffer: SampleBuffer, cycles: CycleStore, installer: Installer,
        gate: Gate, provider: Provider, metrics: Metrics, worker: WorkerSupervisor, clock: Clock = time.time,
    ):
        self.s = settings
        self.buffer = buffer
        self.cycles = cycles
        self.installer = installer
        self.gate = gate
        self.provider = provider
        self.metrics = metrics
        self.worker = worker
        self.clock = clock
        # a cycle recovery.py queued again to resume from its checkpoint (every other was settled at start-up)
        self.current: CycleRecord | None = next((r for r in cycles.list() if r.state.active), None)
        self.reading = Reading()
        self.gate_state = GateState(reasons=["starting"])
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._staging: Path | None = None
        self._paused_at: float | None = None
        self._final_event: FinalEvent | None = None  # evidence for the cycle report
        self._pending_labels: dict[str, dict[str, int]] = {}  # the labels a pending candidate was last judged on

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.active() is not None:
                self.worker.kill()
                self._finish(self.current, CycleState.ABORTED, "the daemon is shutting down")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive any one bad poll
                log.exception("scheduler tick failed")
            self._stop.wait(self.s.poll_interval_s)

    # ---- what others ask ----------------------------------------------------------------
    def active(self) -> CycleRecord | None:
        """The cycle that is queued, waiting, running or paused, if any."""
        current = self.current
        return current if current is not None and current.state.active else None

    def request(self, level: Any, criterion: str, allocation: str, epochs: int, force: bool, trigger: str = "api") -> CycleRecord:
        """Queue a cycle (options already validated); Conflict while another is active."""
        with self._lock:
            busy = self.active()
            if busy is not None:
                raise Conflict(f"cycle {busy.id} is {busy.state.value}")
            now = self.clock()
            record = CycleRecord(
                id=time.strftime("%Y%m%dT%H%M%S", time.localtime(now)) + "-" + uuid.uuid4().hex[:6],
                state=CycleState.QUEUED, created=now, forced=force, trigger=trigger,
                request={"level": level, "criterion": criterion, "allocation": allocation, "epochs": epochs, "force": force},
            )
            self.current = record
            self.cycles.save(record)
            return record

    def activate(self, version: str) -> Served:
        """Install a stored version (rollback or roll forward); Conflict while a cycle is active."""
        with self._lock:
            self._drop_pending(f"version {version} was activated")
            busy = self.active()
            if busy is not None:
                raise Conflict(f"cycle {busy.id} is {busy.state.value}; activate after it ends")
            return self.installer.install(version)

    def fall_back(self, version: str, why: str) -> CycleRecord | None:
        """Serve `version` (the generalist) again at once because traffic changed: a swap, not a cycle.
        An active cycle (specialising on the old traffic) is aborted first. The swap is recorded in
        the cycle history (trigger "drift"). None when `version` is already served."""
        with self._lock:
            served = self.installer.holder.current
            if served is not None and served.version == version:
                return None
            self._drop_pending(f"traffic changed ({why})")
            busy = self.active()
            if busy is not None:
                self._abort(busy, f"traffic changed: {why}")
            now = self.clock()
            record = CycleRecord(
                id=time.strftime("%Y%m%dT%H%M%S", time.localtime(now)) + "-" + uuid.uuid4().hex[:6],
                state=CycleState.ACCEPTED, created=now, trigger="drift", request={"fallback": version},
                reason=f"{why}: serving the generalist {version} again until a cycle re-specialises",
                started=now, finished=now, version_before=served.version if served else None, version_after=version,
            )
            self.installer.install(version)
            self.metrics.generalist_fallbacks.inc()
            self.cycles.save(record)
            log.warning("traffic changed (%s): serving the generalist %s", why, version)
            return record

    def backoff(self) -> Backoff:
        return backoff(self.cycles.list(), self.clock(), self.s.cycle_backoff_base_s, self.s.cycle_backoff_max_s)

    def view(self) -> SchedulerView:
        return SchedulerView(self.current, self.gate_state, self.reading, self.backoff())

    # ---- one poll -----------------------------------------------------------------------
    def tick(self) -> None:
        try:
            reading = self.provider.read()
        except Exception as exc:
            log.warning("telemetry read failed: %s", exc)
            reading = Reading()
        stats = self.buffer.stats()
        gate = self.gate.evaluate(reading, stats["samples"], stats["per_class"])
        self.reading, self.gate_state = reading, gate
        self.metrics.observe_poll(reading, gate, stats, self.s.thermal_limit_c, self.gate.power_budget(reading),
                                  self.current.state if self.current else None)
        served = self.installer.holder.current
        if served is not None:
            served.prior.refresh(served.assumes)
            self.metrics.observe_prior(served.prior.view(served.assumes))
        with self._lock:
            current = self.active()
            if current is None:
                self._maybe_periodic(gate, stats)
            elif current.state is CycleState.PENDING:
                self._review(current)
            elif current.state in (CycleState.QUEUED, CycleState.WAITING):
                if gate.hard_ok if current.forced else gate.open:
                    self._launch(current, stats)
                else:
                    current.state, current.reason = CycleState.WAITING, "; ".join(gate.reasons)
                    self.cycles.save(current)
            else:
                self._supervise(current, gate)

    def _maybe_periodic(self, gate: GateState, stats: dict) -> None:
        if not self.s.auto_cycles or not gate.open or self.backoff().holds(self.clock()):
            return
        last = max((r.max_sample_id or 0 for r in self.cycles.list()), default=0)
        if stats["last_id"] - last >= self.s.new_samples_per_cycle:
            s = self.s
            self.request(s.cycle_level, s.cycle_criterion, s.cycle_allocation, s.cycle_epochs, force=False, trigger="periodic")

    def _launch(self, record: CycleRecord, stats: dict) -> None:
        served = self.installer.holder.current
        if served is None:
            self._finish(record, CycleState.FAILED, "no model is being served")
            return
        store = self.installer.store
        try:
            self._staging = store.staging_dir()
        except OSError as exc:
            self._finish(record, CycleState.FAILED, f"cannot write to the state directory: {exc}")
            return
        req, s = record.request, self.s
        # a cycle resumed after a restart (recovery.py) trains on the snapshot it began with, from its checkpoints
        resumed = record.max_sample_id is not None and record.version_before == served.version
        max_sample_id = record.max_sample_id if resumed else stats["last_id"]
        checkpoints = s.checkpoints_dir / record.id
        if not resumed:
            shutil.rmtree(checkpoints, ignore_errors=True)
        job = CycleJob(
            cycle_id=record.id, buffer_path=str(self.buffer.path), model_dir=str(store.path(served.version)),
            served_version=served.version, staging_dir=str(self._staging), max_sample_id=max_sample_id,
            level=req["level"], criterion=req["criterion"], allocation=req["allocation"], epochs=req["epochs"],
            finetune_before=s.cycle_finetune_before, tolerance=s.cycle_tolerance, batch_size=s.cycle_batch_size,
            min_steps=s.cycle_min_steps, hflip=s.cycle_hflip, max_accuracy_drop=s.max_accuracy_drop,
            min_size_gain=s.min_size_gain, device=s.device, nice=s.worker_nice, memory_limit_mb=s.cycle_memory_limit_mb,
            memory_budget_mb=s.cycle_memory_budget_mb,
            min_agreement=s.min_agreement, min_label_evidence=s.min_label_evidence, target_prior=served.prior.target(), prior_floor=s.prior_floor,
            acceptance_confidence=s.acceptance_confidence, disagreement_labels=s.disagreement_labels,
            retrain_scope=s.cycle_retrain_scope, retrain_last_share=s.cycle_retrain_last_share, judge_share=s.cycle_judge_share,
            engine_backends=tuple(b.value for b in backends_to_build(s.serving_backend)), serving_threads=s.serving_threads,
            recipe=s.cycle_recipe, distil_budget_s=s.cycle_distil_budget_s, prune_steps=s.cycle_prune_steps, checkpoint_dir=str(checkpoints),
            checkpoint_s=s.cycle_checkpoint_s, recent_half_life=s.cycle_recent_half_life or None,
        )
        self.worker.start(job)
        record.state, record.reason, record.started = CycleState.RUNNING, None, self.clock()
        record.max_sample_id, record.version_before = max_sample_id, served.version
        self._paused_at = None
        self.cycles.save(record)
        log.info("cycle %s started on %s (%d samples)", record.id, served.version, stats["samples"])

    def _apply(self, record: CycleRecord, events: Iterable[WorkerEvent]) -> FinalEvent | None:
        """Apply the worker's events to the record; return its final event, if any."""
        final = None
        for event in events:
            if isinstance(event, StepEvent):
                record.step = event.step
                record.progress = dict(event.details) or record.progress
            elif isinstance(event, ProgressEvent):
                record.progress = event.to_dict()
            elif isinstance(event, ProbeEvent):
                record.probes.append(event.probe)
            elif isinstance(event, CostPredictedEvent):
                record.cost = event.to_dict()
            elif isinstance(event, CostMeasuredEvent):
                record.cost = {**record.cost, "actual": event.actual.to_dict()}
            elif isinstance(event, FINAL_EVENTS):
                final = event
        return final

    def _supervise(self, record: CycleRecord, gate: GateState) -> None:
        final = self._apply(record, self.worker.drain())
        if final is not None:
            self._conclude(record, final)
            return
        exitcode = self.worker.exitcode()
        if exitcode is not None:
            final = self._apply(record, self.worker.drain(wait_s=0.2))  # the last events may still be in flight
            if final is not None:
                self._conclude(record, final)
            else:
                self._finish(record, CycleState.FAILED, f"worker exited with code {exitcode} (killed or out of memory)")
            return
        now = self.clock()
        running_for = now - (record.started or now) - record.paused_seconds - (now - self._paused_at if self._paused_at else 0)
        if running_for > self.s.cycle_timeout_s:
            self._finish(record, CycleState.FAILED, f"exceeded cycle_timeout_s ({self.s.cycle_timeout_s:g}s)")
            return
        allowed = gate.hard_ok if record.forced else gate.may_continue
        if record.state is CycleState.RUNNING and not allowed:
            self.worker.pause()
            self._paused_at = now
            record.state, record.reason = CycleState.PAUSED, "; ".join(gate.reasons)
        elif record.state is CycleState.PAUSED:
            if allowed:
                self.worker.resume()
                record.paused_seconds += now - (self._paused_at or now)
                self._paused_at = None
                record.state, record.reason = CycleState.RUNNING, None
            elif now - (self._paused_at or now) > self.s.pause_timeout_s:
                self._abort(record, f"paused longer than pause_timeout_s ({self.s.pause_timeout_s:g}s): {'; '.join(gate.reasons)}")
                return
            else:
                record.reason = "; ".join(gate.reasons)
        self.cycles.save(record)

    def _abort(self, record: CycleRecord, reason: str) -> None:
        """Tell the worker to abort and give it a moment to report what it spent (its cost so far) before
        it is killed and the record ends."""
        started = self.worker.started
        self.worker.abort()
        self.worker.kill(grace_s=5)
        if started:
            self._apply(record, self.worker.drain(wait_s=0.2))
        self._finish(record, CycleState.ABORTED, reason)

    def _conclude(self, record: CycleRecord, event: FinalEvent) -> None:
        self._final_event = event
        self.worker.kill(grace_s=10)
        if not isinstance(event, ResultEvent):
            self._finish(record, CycleState.FAILED if isinstance(event, FailedEvent) else CycleState.ABORTED, event.reason)
            return
        record.metrics = event.summary
        record.evidence = event.evidence.to_dict() if event.evidence is not None else {}
        if event.pending:
            record.state, record.reason, record.step, record.pending_since = CycleState.PENDING, event.reason, "pending", self.clock()
            self.cycles.save(record)
            log.info("cycle %s pending: %s", record.id, event.reason)
            return
        if not event.accepted:
            self._finish(record, CycleState.REJECTED, event.reason)
            return
        self._install(record, event.reason, event.engines)

    def _install(self, record: CycleRecord, reason: str, engines: list) -> None:
        """Install the candidate in staging through the one install path; the record ends accepted (or
        failed, when it does not install)."""
        # The version name is recorded before the commit: a restart then knows whether the
        # rename happened (complete the install) or not (the staging dir is discarded).
        version = self.installer.store.next_version()
        record.step, record.reason, record.version_after = "install", reason, version
        record.engines = [outcome.to_dict() for outcome in engines]
        self.cycles.save(record)
        staging, self._staging = self._staging, None
        try:
            self.installer.install_candidate(staging, version, [outcome.backend for outcome in engines])
        except Exception as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            record.version_after = None
            self._finish(record, CycleState.FAILED, f"could not install the new model: {type(exc).__name__}: {exc}")
            return
        self._finish(record, CycleState.ACCEPTED, reason)
        log.info("cycle %s accepted: now serving %s", record.id, version)

    # ---- a pending candidate ------------------------------------------------------------
    def _review(self, record: CycleRecord) -> None:
        """A pending candidate (each poll, and at once when one of its asked samples is labelled):
        rejected once pending_timeout_s has passed; whenever the labels of its asked disagreements
        changed (through any endpoint), judged again by the acceptance rule on them (accepted: installed)."""
        waited = self.clock() - (record.pending_since or self.clock())
        if waited > self.s.pending_timeout_s:
            self._finish(record, CycleState.REJECTED, f"timed out: pending longer than pending_timeout_s ({self.s.pending_timeout_s:g}s)"
                         f" without the labels to decide; {record.reason}")
            return
        evidence = JudgingEvidence.from_dict(record.evidence)
        labels = {str(k): v for k, v in self.buffer.labels_of([int(d.key) for d in evidence.asked]).items()}
        if labels == self._pending_labels.get(record.id):
            return
        self._pending_labels = {record.id: labels}
        decision = decide(record.metrics, Acceptance.of(self.s), evidence, labels)
        if decision.accepted:
            self._install(record, decision.reason, [])
        elif decision.verdict is Verdict.REJECTED:
            self._finish(record, CycleState.REJECTED, decision.reason)
        elif decision.reason != record.reason:
            record.reason = decision.reason
            self.cycles.save(record)

    def labelled(self, sample_id: int) -> None:
        """A buffered sample got a label: a pending candidate that asked for it is judged again."""
        with self._lock:
            current = self.active()
            if current is not None and current.state is CycleState.PENDING and any(
                    d.get("key") == str(sample_id) for d in current.evidence.get("asked", ())):
                self._review(current)

    def _drop_pending(self, why: str) -> None:
        """The served model changes under a pending candidate: it was judged against another, rejected."""
        current = self.active()
        if current is not None and current.state is CycleState.PENDING:
            self._finish(current, CycleState.REJECTED, f"{why} while the candidate was pending; {current.reason}")

    def _finish(self, record: CycleRecord, state: CycleState, reason: str | None) -> None:
        self.worker.kill()
        if self._staging is not None:  # an unaccepted candidate is never kept
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        shutil.rmtree(self.s.checkpoints_dir / record.id, ignore_errors=True)  # an ended cycle never resumes
        now = self.clock()
        if self._paused_at is not None:
            record.paused_seconds += now - self._paused_at
            self._paused_at = None
        record.state, record.reason, record.finished = state, reason, now
        # Metrics first: whoever sees the finished record must also see it counted.
        self.metrics.cycle_finished(state.value, record.finished - record.started if record.started else None)
        self.cycles.save(record)
        write_report_async(self.cycles.folder(record), record.to_dict(), evidence(self._final_event))
        self._final_event = None
        log.info("cycle %s %s: %s", record.id, state.value, reason)
