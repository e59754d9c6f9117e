"""A long cycle survives a daemon restart: `edgetune serve` is killed (SIGKILL, its worker with it)
while the patient recipe trains, and the restarted daemon resumes the same cycle from the checkpoint
in its state dir instead of failing it or starting over."""
from __future__ import annotations

import base64
import signal
import time

import pytest
import torch

pytestmark = pytest.mark.slow  # two daemon starts and a cycle of real training

FINAL = ("accepted", "rejected", "failed", "aborted")
ENV = {"EDGETUNE_CYCLE_RECIPE": "patient", "EDGETUNE_CYCLE_DISTIL_BUDGET_S": "25", "EDGETUNE_CYCLE_CHECKPOINT_S": "0.01", "EDGETUNE_CYCLE_PRUNE_STEPS": "1",
       "EDGETUNE_CYCLE_LEVEL": "0.5", "EDGETUNE_MIN_SIZE_GAIN": "0.0", "EDGETUNE_MAX_ACCURACY_DROP": "1.0",
       "EDGETUNE_CYCLE_BATCH_SIZE": "16"}


def saved_epoch(folder) -> int:
    """The furthest epoch any retraining checkpoint of the cycle has saved (0: none yet)."""
    best = 0
    for path in folder.glob("retrain-*.pt"):
        try:
            best = max(best, torch.load(path, map_location="cpu", weights_only=False)["run"]["epoch"])
        except Exception:  # mid-rename on another process's clock: look again
            continue
    return best


def test_a_killed_daemon_resumes_its_cycle_from_the_checkpoint(make_daemon, device_images):
    d = make_daemon(ENV).start()
    payload = [{"image": base64.b64encode(b).decode(), "label": label} for b, label in device_images[:60]]
    assert d.client.post("/samples", json={"samples": payload}).status_code == 201
    cycle_id = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
    folder = d.state_dir / "cycle-checkpoints" / cycle_id
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and saved_epoch(folder) < 2:
        assert d.client.get(f"/cycles/{cycle_id}").json()["state"] not in FINAL, "the cycle ended before the kill"
        time.sleep(0.1)
    killed_at = saved_epoch(folder)
    assert killed_at >= 2
    d.stop(signal.SIGKILL)

    d.start()
    record = d.wait_cycle(cycle_id, FINAL, timeout=300)
    assert record["state"] in ("accepted", "rejected"), record
    retrained = [p for p in record["probes"] if p.get("resumed_epoch")]
    assert retrained and retrained[-1]["resumed_epoch"] >= killed_at, record["probes"]
    assert not folder.exists()  # an ended cycle leaves no checkpoint behind
