"""The gate, for real: a cycle waits while the device is too hot, pauses when it heats up mid-cycle,
resumes when it cools, and is aborted when the spike lasts. How soon (the very next poll) is
checked poll by poll in test_cycles_inprocess.py; here the timeouts only bound the waits."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow  # real daemons and workers; test_cycles_inprocess.py is the fast twin


def _seed(d, images, n=150):
    for data, label in images[:n]:
        assert d.infer(data, label).status_code == 200


def _wait_state(d, cycle_id, state, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = d.client.get(f"/cycles/{cycle_id}").json()
        if record["state"] == state:
            return record
        time.sleep(0.05)
    raise AssertionError(f"cycle never reached {state}: {record}")


def test_cycle_waits_pauses_resumes_on_temperature(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_THERMAL_LIMIT_C": "70", "EDGETUNE_THERMAL_HYSTERESIS_C": "5", "EDGETUNE_CYCLE_EPOCHS": "6",
                     "EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()
    _seed(d, device_images)
    d.set_telemetry(temperature_c=80.0)
    cycle_id = d.client.post("/prune", json={"level": 0.5, "force": True}).json()["cycle_id"]
    record = _wait_state(d, cycle_id, "waiting")
    assert "too hot" in record["reason"]
    status = d.client.get("/status").json()
    assert status["scheduler"]["thermal_ok"] is False
    assert any("too hot" in r for r in status["scheduler"]["why_not_running"])
    time.sleep(1.0)
    assert d.client.get(f"/cycles/{cycle_id}").json()["state"] == "waiting"  # force never skips the thermal limit

    d.set_telemetry(temperature_c=68.0)  # below the limit but inside the hysteresis band: still closed
    time.sleep(1.0)
    assert d.client.get(f"/cycles/{cycle_id}").json()["state"] == "waiting"
    d.set_telemetry(temperature_c=50.0)
    _wait_state(d, cycle_id, "running")
    # wait until training batches are flowing, then heat up
    deadline = time.monotonic() + 120
    while not d.client.get(f"/cycles/{cycle_id}").json()["progress"].get("batch") and time.monotonic() < deadline:
        time.sleep(0.1)
    d.set_telemetry(temperature_c=85.0)
    record = _wait_state(d, cycle_id, "paused", timeout=30)
    assert "too hot" in record["reason"]
    def step(progress):
        return progress.get("epoch", 0) * progress.get("batches_per_epoch", 0) + progress.get("batch", 0)

    at_pause = step(record["progress"])
    time.sleep(1.5)
    assert step(d.client.get(f"/cycles/{cycle_id}").json()["progress"]) <= at_pause + 1  # the worker really stopped

    d.set_telemetry(temperature_c=45.0)
    _wait_state(d, cycle_id, "running", timeout=30)
    final = d.wait_cycle(cycle_id, ("accepted", "rejected", "failed", "aborted"))
    assert final["state"] in ("accepted", "rejected") and final["paused_seconds"] >= 1.0
    # the real worker's cost prediction (a micro-profile) beside what the cycle then took
    cost = final["cost"]
    assert cost["predicted"]["batch_size"] == 64 and cost["predicted"]["source"] == "rss_hwm", cost
    assert cost["predicted"]["peak_mb"] > 0 and cost["predicted"]["duration_s"] > 0
    assert cost["actual"]["peak_mb"] > 0 and cost["actual"]["duration_s"] > 0 and cost["actual"]["complete"] is True
    # each phase predicted (the probes at a copy pruned at the cycle's level) and timed
    assert 0 < cost["predicted"]["pruned_params"] < cost["predicted"]["params"], cost
    assert cost["actual"]["phases"]["retrain"] > 0 and cost["actual"]["phases"]["prune"] > 0
    assert cost["predicted"]["phases"]["retrain"] > 0 and cost["predicted"]["phases"]["prune"] > 0


def test_sustained_spike_aborts(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_PAUSE_TIMEOUT_S": "2", "EDGETUNE_CYCLE_EPOCHS": "20", "EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()
    _seed(d, device_images, 90)
    cycle_id = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
    _wait_state(d, cycle_id, "running")
    deadline = time.monotonic() + 120  # training, so the cost's profile is behind it
    while not d.client.get(f"/cycles/{cycle_id}").json()["progress"].get("batch") and time.monotonic() < deadline:
        time.sleep(0.1)
    d.set_telemetry(temperature_c=95.0)
    _wait_state(d, cycle_id, "paused", timeout=30)
    record = _wait_state(d, cycle_id, "aborted", timeout=60)
    assert "pause_timeout_s" in record["reason"]
    actual = record["cost"]["actual"]  # what the aborted cycle spent, beside the prediction
    assert actual["complete"] is False and actual["peak_mb"] > 0 and actual["duration_s"] > 0, record["cost"]
    assert sum(actual["phases"].values()) > 0 and record["cost"]["predicted"]["duration_s"] > 0
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    metrics = d.client.get("/metrics").text
    assert 'edgetune_cycles_total{outcome="aborted"} 1.0' in metrics


def test_traffic_pauses_an_unforced_cycle(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_IDLE_SECONDS": "1.5", "EDGETUNE_CYCLE_EPOCHS": "6", "EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()
    _seed(d, device_images, 120)
    time.sleep(1.6)
    cycle_id = d.client.post("/prune", json={"level": 0.5}).json()["cycle_id"]
    _wait_state(d, cycle_id, "running", timeout=30)
    deadline = time.monotonic() + 120
    while not d.client.get(f"/cycles/{cycle_id}").json()["progress"].get("batch") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.infer(device_images[200][0]).status_code == 200  # traffic returns
    record = _wait_state(d, cycle_id, "paused", timeout=30)
    assert "busy" in record["reason"]
    _wait_state(d, cycle_id, "running", timeout=30)  # idle again after idle_seconds


def test_periodic_cycle_starts_by_itself_and_old_versions_are_pruned(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_AUTO_CYCLES": "true", "EDGETUNE_NEW_SAMPLES_PER_CYCLE": "60", "EDGETUNE_KEEP_VERSIONS": "2",
                     "EDGETUNE_MIN_SIZE_GAIN": "0.0", "EDGETUNE_MAX_ACCURACY_DROP": "1.0", "EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()
    _seed(d, device_images, 70)
    final = ("accepted", "rejected", "failed", "aborted")

    def wait_for(n: int) -> list[dict]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cycles = d.client.get("/cycles").json()
            if len(cycles) >= n and all(c["state"] in final for c in cycles):
                return cycles
            time.sleep(0.2)
        raise AssertionError(f"expected {n} finished cycles: {d.client.get('/status').json()['scheduler']}")

    wait_for(1)  # the first 70 samples were enough for one
    _seed(d, device_images[70:], 70)  # 70 new samples: one more
    cycles = wait_for(2)
    assert all(c["trigger"] == "periodic" for c in cycles)
    assert [c["state"] for c in cycles] == ["accepted"] * len(cycles)
    versions = [m["version"] for m in d.client.get("/models").json()]
    # keep_versions = 2, but the generalist (v0001) and the version swapped out (the rollback) always stay;
    # which versions go beyond that is tests/daemon/test_model_store.py's
    assert versions == [f"v{len(cycles) + 1 - i:04d}" for i in range(len(cycles) + 1)]
