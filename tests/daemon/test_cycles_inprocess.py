"""Cycles in process, driven poll by poll: the scheduler's decisions (wait, launch, pause, resume,
abort, time out, conclude, install) with the fake worker in a real spawned process, a real model
store and a clock the test moves. No assertion depends on how fast anything runs: the tests count
polls. tests/daemon/test_gate_e2e.py and test_serve_e2e.py prove the same with the real worker."""
from __future__ import annotations

import re

from fake_worker import FOREVER

from daemon.cycles.cycle_state import CycleState
from test_api_inprocess import png, seed

FINAL = ("accepted", "rejected", "failed", "aborted")


def final(record: dict) -> bool:
    return record["state"] in FINAL


def test_full_cycle_is_accepted_and_installed(inproc):
    c = inproc.client
    seed(inproc, 12)
    cycle_id = c.post("/prune", json={"level": 0.5, "epochs": 5}).json()["cycle_id"]
    inproc.tick()
    record = inproc.cycle(cycle_id)
    assert record["state"] == "running" and record["version_before"] == "v0001" and record["max_sample_id"] == 12
    assert c.get("/status").json()["scheduler"]["state"] == "running"
    record = inproc.run_until(cycle_id, final)
    assert record["state"] == "accepted", record
    assert record["version_after"] == "v0002" and record["step"] == "install"
    assert record["metrics"]["params_after"] == record["metrics"]["params_before"] // 2
    assert record["metrics"]["top1_ceiling"] is None  # NaN is stored as null
    assert record["progress"] == {"epoch": 1, "batch": 5, "batches_per_epoch": 5, "loss": 0.2}
    assert c.get("/status").json()["model"]["version"] == "v0002"
    assert c.get("/status").json()["scheduler"]["state"] == "idle"
    assert [(m["version"], m["active"]) for m in c.get("/models").json()] == [("v0002", True), ("v0001", False)]
    assert (inproc.rt.settings.models_dir / "active").read_text().strip() == "v0002"
    assert c.post("/infer", content=png(999), headers={"content-type": "image/png"}).json()["model_version"] == "v0002"
    metrics = c.get("/metrics").text
    assert re.search(r'^edgetune_cycles_total\{outcome="accepted"\} 1\.0$', metrics, re.M)
    assert re.search(r"^edgetune_swaps_total 1\.0$", metrics, re.M)
    assert re.search(r'^edgetune_model_info\{arch="cifar_small",version="v0002"\} 1\.0$', metrics, re.M)
    assert not list(inproc.rt.settings.models_dir.glob(".staging-*"))
    # roll back through the one install path
    assert c.post("/models/v0001/activate").json()["active"] == "v0001"
    assert (inproc.rt.settings.models_dir / "active").read_text().strip() == "v0001"
    assert re.search(r"^edgetune_swaps_total 2\.0$", c.get("/metrics").text, re.M)


def test_the_retrain_scope_settings_reach_the_cycle(make_inproc):
    d = make_inproc(cycle_retrain_scope="last", cycle_retrain_last_share=0.6)
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"level": 0.5, "epochs": 2}).json()["cycle_id"]
    d.tick()
    record = d.run_until(cycle_id, final)
    assert record["metrics"]["retrain_scope"] == "last" and record["metrics"]["retrain_plan"]["last_share"] == 0.6


def test_rejected_cycle_changes_nothing(make_inproc):
    d = make_inproc(min_size_gain=0.9)
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"level": 0.5, "epochs": 2, "force": True}).json()["cycle_id"]
    record = d.run_until(cycle_id, final)
    assert record["state"] == "rejected" and "min_size_gain" in record["reason"], record
    assert record["version_after"] is None
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    assert [m["version"] for m in d.client.get("/models").json()] == ["v0001"]
    assert not list(d.rt.settings.models_dir.glob(".staging-*"))
    assert 'edgetune_cycles_total{outcome="rejected"} 1.0' in d.client.get("/metrics").text
    assert d.client.post("/prune", json={"force": True}).status_code == 202  # the next may start


def test_a_failing_worker_is_recorded(inproc):
    cycle_id = inproc.client.post("/prune", json={"force": True}).json()["cycle_id"]  # empty buffer
    record = inproc.run_until(cycle_id, final)
    assert record["state"] == "failed" and "snapshot has 0 training" in record["reason"], record
    status = inproc.client.get("/status").json()
    assert status["scheduler"]["consecutive_failures"] == 1 and status["model"]["version"] == "v0001"


def test_waits_pauses_resumes_with_the_temperature(make_inproc):
    d = make_inproc(thermal_limit_c=70, thermal_hysteresis_c=5)
    seed(d, 12)
    d.set_telemetry(temperature_c=80.0)
    cycle_id = d.client.post("/prune", json={"force": True, "epochs": FOREVER}).json()["cycle_id"]
    d.tick(3)
    record = d.cycle(cycle_id)
    assert record["state"] == "waiting" and "too hot" in record["reason"]  # force never skips the thermal limit
    why = d.client.get("/status").json()["scheduler"]["why_not_running"]
    assert any("too hot" in r for r in why)
    d.set_telemetry(temperature_c=68.0)  # below the limit, inside the hysteresis band: still closed
    d.tick(3)
    assert d.cycle(cycle_id)["state"] == "waiting"
    d.set_telemetry(temperature_c=50.0)
    d.tick()
    assert d.cycle(cycle_id)["state"] == "running"  # the first poll with the gate open starts it
    record = d.run_until(cycle_id, lambda r: r["progress"].get("batch", 0) >= 3)

    d.set_telemetry(temperature_c=85.0)
    d.tick()
    record = d.cycle(cycle_id)
    assert record["state"] == "paused" and "too hot" in record["reason"]  # the very next poll pauses it
    # the worker stopped: its progress stays the same for 10 polls in a row (it would move at every
    # poll while training; events already in flight may still arrive first)
    stable, last = 0, None
    for _ in range(2000):
        batch = d.run_until(cycle_id, lambda r: True)["progress"]["batch"]
        stable, last = (stable + 1 if batch == last else 0), batch
        if stable == 10:
            break
    assert stable == 10, "the worker kept training while paused"
    d.clock.advance(30)
    d.set_telemetry(temperature_c=45.0)
    d.tick()
    record = d.cycle(cycle_id)
    assert record["state"] == "running" and record["reason"] is None and record["paused_seconds"] == 30
    d.run_until(cycle_id, lambda r: r["progress"]["batch"] > last + 2)  # it continues where it was
    assert d.client.post("/prune").status_code == 409


def test_a_long_pause_aborts(make_inproc):
    d = make_inproc(pause_timeout_s=60)
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"force": True, "epochs": FOREVER}).json()["cycle_id"]
    d.run_until(cycle_id, lambda r: r["progress"].get("batch", 0) >= 3)
    d.set_telemetry(temperature_c=95.0)
    d.tick()
    assert d.cycle(cycle_id)["state"] == "paused"
    d.clock.advance(60)
    d.tick()
    assert d.cycle(cycle_id)["state"] == "paused"  # not longer than the timeout yet
    d.clock.advance(1)
    d.tick()
    record = d.cycle(cycle_id)
    assert record["state"] == "aborted" and "pause_timeout_s" in record["reason"], record
    assert record["paused_seconds"] == 61
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    assert 'edgetune_cycles_total{outcome="aborted"} 1.0' in d.client.get("/metrics").text
    assert not d.rt.scheduler.worker.started
    actual = record["cost"]["actual"]  # what it spent, where it was when stopped, beside the prediction
    assert actual["complete"] is False and actual["duration_s"] > 0, record["cost"]
    assert actual["phases"]["retrain"] > 0 and actual["phases"]["prune"] == 0
    assert record["cost"]["predicted"]["batch_size"] == 64


def test_a_cycle_over_its_time_budget_is_killed(make_inproc):
    d = make_inproc(cycle_timeout_s=100)
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"force": True, "epochs": FOREVER}).json()["cycle_id"]
    d.run_until(cycle_id, lambda r: r["progress"].get("batch", 0) >= 1)
    d.clock.advance(100)
    d.tick()
    assert d.cycle(cycle_id)["state"] == "running"
    d.clock.advance(1)
    d.tick()
    record = d.cycle(cycle_id)
    assert record["state"] == "failed" and "cycle_timeout_s" in record["reason"], record
    assert not d.rt.scheduler.worker.started


def test_traffic_pauses_an_unforced_cycle_but_not_a_forced_one(make_inproc):
    d = make_inproc(idle_seconds=3600)
    seed(d, 12)
    for force in (False, True):
        cycle_id = d.client.post("/prune", json={"force": force, "epochs": FOREVER}).json()["cycle_id"]
        d.run_until(cycle_id, lambda r: r["progress"].get("batch", 0) >= 1)
        assert d.client.post("/infer", content=png(500), headers={"content-type": "image/png"}).status_code == 200
        d.tick()
        record = d.cycle(cycle_id)
        assert record["state"] == ("running" if force else "paused"), record
        if not force:
            assert "busy" in record["reason"]
            d.client.post("/infer", content=png(501), headers={"content-type": "image/png"})
            d.rt.scheduler.stop()  # shutting down aborts it
            assert d.cycle(cycle_id)["state"] == "aborted"


def test_periodic_cycles_wait_out_the_backoff(make_inproc):
    d = make_inproc(auto_cycles=True, new_samples_per_cycle=5, cycle_backoff_base_s=100, cycle_backoff_max_s=1000)
    d.rt.settings.min_samples = 1
    seed(d, 5)
    d.tick()
    first = d.client.get("/cycles").json()
    assert len(first) == 1 and first[0]["trigger"] == "periodic"
    first_id = first[0]["id"]
    d.rt.scheduler.stop()  # abort it: aborts do not count as failures
    assert d.cycle(first_id)["state"] == "aborted"
    d.rt.cycles.get(first_id).state = CycleState.FAILED  # as if it had failed
    status = d.client.get("/status").json()["scheduler"]
    assert status["consecutive_failures"] == 1 and status["next_automatic_cycle_not_before"] == d.clock() + 100
    assert "next automatic cycle not before" in status["why_not_running"][-1]
    seed(d, 5, start=100)
    d.clock.advance(99)
    d.tick(3)
    assert len(d.client.get("/cycles").json()) == 1  # still backing off
    d.clock.advance(1)
    d.tick()
    cycles = d.client.get("/cycles").json()
    assert len(cycles) == 2 and cycles[0]["trigger"] == "periodic" and cycles[0]["state"] == "queued"
    d.tick()
    assert d.cycle(cycles[0]["id"])["state"] == "running"


def test_the_running_cycle_shows_its_cost_prediction(inproc):
    seed(inproc, 12)
    cycle_id = inproc.client.post("/prune", json={"force": True, "epochs": FOREVER}).json()["cycle_id"]
    record = inproc.run_until(cycle_id, lambda r: r["cost"] or final(r))
    assert record["state"] == "running", record
    cost = inproc.client.get("/status").json()["cycle"]["cost"]
    assert cost["predicted"]["batch_size"] == 64 and cost["budget_mb"] is None and cost["note"] == ""
    assert cost["predicted"]["peak_mb"] == 507 + 2 * 64 + 2 and cost["predicted"]["duration_s"] > 0
    assert "actual" not in cost  # not yet
    inproc.rt.scheduler.stop()


def test_the_cycle_record_has_the_predicted_cost_beside_the_actual(inproc):
    seed(inproc, 12)
    cycle_id = inproc.client.post("/prune", json={"force": True, "level": 0.5, "epochs": 3}).json()["cycle_id"]
    record = inproc.run_until(cycle_id, final)
    assert record["state"] == "accepted", record
    shown = inproc.client.get(f"/cycles/{cycle_id}").json()["cost"]
    phases = {"finetune", "ranking", "prune", "fade", "retrain", "validation"}
    assert shown["predicted"]["batch_size"] == 64 and set(shown["predicted"]["phases"]) == phases
    assert shown["actual"]["duration_s"] >= 0 and "peak_mb" in shown["actual"] and shown["actual"]["complete"] is True
    assert set(shown["actual"]["phases"]) == phases and shown["actual"]["phases"]["retrain"] > 0


def test_a_tight_budget_picks_a_smaller_batch(make_inproc):
    d = make_inproc(cycle_memory_budget_mb=560)  # the fake profile: 507 MiB + 2 MiB per sample, evaluation 2 MiB
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"force": True, "level": 0.5, "epochs": 2}).json()["cycle_id"]
    record = d.run_until(cycle_id, final)
    assert record["state"] == "accepted", record
    cost = record["cost"]
    assert cost["predicted"]["batch_size"] == 25 and cost["predicted"]["peak_mb"] <= 560 and cost["budget_mb"] == 560
    assert "batch size 25 (not 64)" in cost["note"]


def test_a_budget_full_retraining_cannot_meet_picks_a_cheaper_scope(make_inproc):
    d = make_inproc(cycle_memory_budget_mb=510)  # full: 507 + 2·2 + 2 > 510 at the smallest batch; cheaper: 480 + b + 2
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"force": True, "level": 0.5, "epochs": 2}).json()["cycle_id"]
    record = d.run_until(cycle_id, final)
    assert record["state"] == "accepted", record
    predicted = record["cost"]["predicted"]
    assert (predicted["scope"], predicted["batch_size"]) == ("last_bn", 28), record["cost"]
    assert "retraining scope last_bn (not full) and batch size 28 (not 64)" in record["cost"]["note"]


def test_a_budget_nothing_fits_refuses_the_cycle_with_the_figures(make_inproc):
    d = make_inproc(cycle_memory_budget_mb=480)
    seed(d, 12)
    cycle_id = d.client.post("/prune", json={"force": True, "level": 0.5, "epochs": 2}).json()["cycle_id"]
    record = d.run_until(cycle_id, final)
    assert record["state"] == "failed", record
    assert "CycleRefused" in record["reason"] and "smallest batch size (2)" in record["reason"]
    assert "cycle_memory_budget_mb=480" in record["reason"]
    for scope in ("full", "last_bn", "last", "bias"):
        assert f"retraining scope {scope}:" in record["reason"]
    assert record["cost"]["predicted"]["batch_size"] == 2 and record["cost"]["note"].startswith("refused:")
    assert d.client.get("/status").json()["model"]["version"] == "v0001"


def test_falling_back_to_the_generalist_aborts_a_running_cycle_with_its_cost(inproc):
    """Traffic changed (the drift watch's fall_back): the running cycle is aborted first, and what it
    spent is recorded beside its prediction."""
    seed(inproc, 12)
    first = inproc.client.post("/prune", json={"force": True, "level": 0.5, "epochs": 3}).json()["cycle_id"]
    assert inproc.run_until(first, final)["version_after"] == "v0002"
    busy = inproc.client.post("/prune", json={"force": True, "epochs": FOREVER}).json()["cycle_id"]
    inproc.run_until(busy, lambda r: r["progress"].get("batch", 0) >= 3)
    swap = inproc.rt.scheduler.fall_back("v0001", "a class the specialist never saw")
    assert swap is not None and swap.version_after == "v0001"
    record = inproc.cycle(busy)
    assert record["state"] == "aborted" and "traffic changed" in record["reason"], record
    assert record["cost"]["actual"]["complete"] is False and record["cost"]["actual"]["phases"]["retrain"] > 0
    assert inproc.client.get("/status").json()["model"]["version"] == "v0001"
