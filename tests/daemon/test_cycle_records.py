"""Cycle records on disk, and the recovery of cycles the daemon died in (in process)."""
from __future__ import annotations

import json
import math
import shutil
import time

import pytest
from conftest import InProcess

from daemon.cycles.cycle_records import CycleRecord, CycleStore
from daemon.cycles.cycle_state import CycleState, CycleTrigger


def test_records_round_trip_as_strict_json_and_old_records_load(tmp_path):
    store = CycleStore(tmp_path / "cycles")
    record = CycleRecord(id="c1", state=CycleState.RUNNING, created=1.0, request={"level": 0.5},
                         metrics={"top1_ceiling": math.nan, "loss": [math.inf, 1.0]})
    store.save(record)
    text = (tmp_path / "cycles" / "c1" / "cycle.json").read_text()
    data = json.loads(text)
    assert data["state"] == "running" and data["metrics"] == {"top1_ceiling": None, "loss": [None, 1.0]}
    assert "NaN" not in text and "Infinity" not in text
    # a record written before CycleState existed: plain strings, the same fields
    old = {"id": "c0", "state": "accepted", "created": 0.5, "request": {"level": "auto"}, "forced": False, "trigger": "api",
           "reason": "ok", "started": 0.6, "finished": 0.9, "step": "install", "progress": {}, "probes": [], "metrics": {},
           "max_sample_id": 3, "version_before": "v0001", "version_after": "v0002", "paused_seconds": 0.0}
    (tmp_path / "cycles" / "c0").mkdir()
    (tmp_path / "cycles" / "c0" / "cycle.json").write_text(json.dumps(old))
    (tmp_path / "cycles" / "bad").mkdir()
    (tmp_path / "cycles" / "bad" / "cycle.json").write_text('{"id": "bad", "state": "exploded"}')
    (tmp_path / "cycles" / "c1" / ".cycle.json.tmp").write_text("half")
    reloaded = CycleStore(tmp_path / "cycles")
    assert [r.id for r in reloaded.list()] == ["c1", "c0"]  # newest first; the unreadable one skipped
    # loaded as it was, fields added since (engines, cost, evidence, pending_since) at their defaults
    assert reloaded.get("c0").state is CycleState.ACCEPTED and reloaded.get("c0").to_dict() == {**old, "engines": [], "cost": {}, "evidence": {}, "pending_since": None}
    assert reloaded.get("c1").state is CycleState.RUNNING
    assert reloaded.list(limit=1)[0].id == "c1" and reloaded.get("nope") is None
    assert not (tmp_path / "cycles" / "c1" / ".cycle.json.tmp").exists()


def test_every_trigger_round_trips_and_an_unknown_one_is_refused(tmp_path):
    store = CycleStore(tmp_path / "cycles")
    for trigger in ("api", "periodic", "drift"):  # as the scheduler passes them, plain strings
        store.save(CycleRecord(id=trigger, state=CycleState.ACCEPTED, created=1.0, request={}, trigger=trigger))
    reloaded = CycleStore(tmp_path / "cycles")
    assert {r.id: r.trigger for r in reloaded.list()} == {t.value: t for t in CycleTrigger}
    assert json.loads((tmp_path / "cycles" / "drift" / "cycle.json").read_text())["trigger"] == "drift"
    with pytest.raises(ValueError, match="cron"):
        CycleRecord(id="x", state=CycleState.QUEUED, created=1.0, request={}, trigger="cron")


def _install_record(state_dir, cycle_id: str, version_after: str) -> None:
    """A record as the scheduler writes it just before committing an accepted candidate."""
    folder = state_dir / "cycles" / cycle_id
    folder.mkdir(parents=True)
    record = {"id": cycle_id, "state": "running", "created": time.time() - 60, "request": {"level": 0.3},
              "step": "install", "started": time.time() - 50, "reason": "fine", "version_before": "v0001",
              "version_after": version_after}
    (folder / "cycle.json").write_text(json.dumps(record))


def test_restart_completes_a_committed_install_and_fails_the_rest(tmp_path, untrained_model_dir):
    state = tmp_path / "state"
    InProcess(state, untrained_model_dir).close()
    shutil.copytree(untrained_model_dir, state / "models" / "v0002")
    _install_record(state, "c-committed", "v0002")
    _install_record(state, "c-uncommitted", "v0003")
    d = InProcess(state, untrained_model_dir)
    try:
        done = d.cycle("c-committed")
        assert done["state"] == "accepted" and "completed on restart" in done["reason"], done
        failed = d.cycle("c-uncommitted")
        assert failed["state"] == "failed" and failed["reason"] == "interrupted: the daemon stopped while the cycle was running (install)"
        assert failed["version_after"] is None and failed["finished"] is not None
        assert d.client.get("/status").json()["model"]["version"] == "v0002"
        assert (state / "models" / "active").read_text().strip() == "v0002"
        assert "edgetune_swaps_total 1.0" in d.client.get("/metrics").text
    finally:
        d.close()
