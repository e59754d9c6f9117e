"""Cycle records: one JSON file per cycle under `cycles/<id>/cycle.json`, rewritten atomically on
each change, and held in memory for the API."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prune_core.atomic import atomic_write
from prune_core.jsonsafe import finite

from .cycle_state import CycleState, CycleTrigger

log = logging.getLogger("edgetune.cycles")


@dataclass
class CycleRecord:
    id: str
    state: CycleState
    created: float
    request: dict
    forced: bool = False
    trigger: CycleTrigger = CycleTrigger.API
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
    engines: list = field(default_factory=list)  # BuildOutcome.to_dict() per backend built for the candidate before its swap
    cost: dict = field(default_factory=dict)  # predicted (and budget, note) before the heavy work; actual after it
    evidence: dict = field(default_factory=dict)  # prune_core.evidence.JudgingEvidence.to_dict(): what the candidate was judged on
    pending_since: float | None = None  # when the candidate began waiting for labels (state pending)

    def __post_init__(self) -> None:
        self.state = CycleState(self.state)  # records on disk carry the plain values
        self.trigger = CycleTrigger(self.trigger)

    def to_dict(self) -> dict:
        """Strict JSON (NaN/inf as null), the state as its plain value."""
        data = finite(asdict(self))
        data["state"] = self.state.value
        data["trigger"] = self.trigger.value
        return data


class CycleStore:
    """The records of every cycle, loaded at start-up; `save` writes one through to disk."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob("*/.*.tmp"):  # a record or report write cut short by a crash
                leftover.unlink()
        except OSError as exc:
            log.warning("cycle history %s is not writable: %s", self.dir, exc)
        self._records = {r.id: r for r in self._load()}

    def _load(self) -> list[CycleRecord]:
        records = []
        for path in self.dir.glob("*/cycle.json"):
            try:
                records.append(CycleRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable cycle record %s: %s", path, exc)
        return records

    def get(self, cycle_id: str) -> CycleRecord | None:
        return self._records.get(cycle_id)

    def list(self, limit: int | None = None) -> list[CycleRecord]:
        """Newest first."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.created, reverse=True)
        return records if limit is None else records[:limit]

    def save(self, record: CycleRecord) -> None:
        """Keep `record` and replace its file atomically. A full or read-only disk is logged, not
        raised: the record lives on in memory (and the API), and the next save that fits writes it."""
        with self._lock:
            self._records[record.id] = record
        folder = self.dir / record.id
        body = json.dumps(record.to_dict(), indent=2)
        try:
            folder.mkdir(exist_ok=True)
            atomic_write(folder / "cycle.json", lambda tmp: Path(tmp).write_text(body))
        except OSError as exc:
            log.warning("cycle %s: record not saved: %s", record.id, exc)

    def folder(self, record: CycleRecord) -> Path:
        return self.dir / record.id
