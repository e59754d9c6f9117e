"""Cycle reports on real cycles: report.json + report.png in the state dir, served over HTTP."""
from __future__ import annotations

import io
import math
import time

import pytest
from PIL import Image

from daemon.cycles.report import MAX_CURVE_POINTS, LossCurve, build_report

FINAL = ("accepted", "rejected", "failed", "aborted")


def _wait_report(d, cycle_id: str, timeout: float = 90) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = d.client.get(f"/cycles/{cycle_id}/report.png")
        if r.status_code == 200:
            return r.content
        time.sleep(0.2)
    raise AssertionError(f"no report for {cycle_id}: {r.status_code} {r.text}\n{d.log.read_text()[-2000:]}")


@pytest.mark.slow
def test_every_finished_cycle_gets_a_report(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()

    # a cycle that fails before training (empty buffer) still gets a report, with what exists
    failed = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
    assert d.wait_cycle(failed, FINAL)["state"] == "failed"
    png = _wait_report(d, failed)
    assert png.startswith(b"\x89PNG")
    report = d.client.get(f"/cycles/{failed}/report").json()
    assert report["state"] == "failed" and "held-out" in report["reason"]
    assert report["channels"] == [] and report["curve"] == []

    for data, label in device_images[:120]:
        assert d.infer(data, label).status_code == 200
    cycle_id = d.client.post("/prune", json={"level": 0.5, "epochs": 2, "force": True}).json()["cycle_id"]
    assert d.client.get(f"/cycles/{cycle_id}/report.png").status_code == 404  # not finished yet
    record = d.wait_cycle(cycle_id, FINAL)
    assert record["state"] in ("accepted", "rejected"), record
    png = _wait_report(d, cycle_id)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 800 and image.height > 300

    folder = d.state_dir / "cycles" / cycle_id
    assert (folder / "report.png").read_bytes() == png
    report = d.client.get(f"/cycles/{cycle_id}/report").json()
    assert report["cycle_id"] == cycle_id and report["state"] == record["state"]
    assert report["version_before"] == "v0001"
    assert report["size"]["params_after"] < report["size"]["params_before"]
    assert 0 <= report["accuracy"]["top1_after"] <= 1 and 0 <= report["accuracy"]["agreement_with_before"] <= 1
    # the teacher's answer is its own most probable one: the loss it expects is never negative
    assert 0 <= report["accuracy"]["expected_loss"] <= 1 - report["accuracy"]["agreement_with_before"] + 1e-9
    channels = {c["layer"]: c for c in report["channels"]}
    assert channels and any(c["after"] < c["before"] for c in channels.values())
    assert all(0 < c["after"] <= c["before"] for c in channels.values())
    curve = report["curve"]
    assert len(curve) >= 2 and all(math.isfinite(p["loss"]) for p in curve)
    assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
    assert not list(folder.glob(".*.tmp"))  # written atomically, nothing left over


def test_report_endpoints_refuse_unknown_ids(inproc):
    for bad in ("nope", "%2E%2E", "..%2Fmodels"):
        for suffix in ("report", "report.png"):
            r = inproc.client.get(f"/cycles/{bad}/{suffix}")
            assert r.status_code == 404, (bad, r.text)
            assert "no cycle" in r.json()["detail"] or r.json()["detail"] == "Not Found"


def test_loss_curve_is_thinned_and_nan_safe():
    curve = LossCurve()
    for run in range(2):
        for step in range(3000):
            curve.add(epoch=1 + step // 100, batch=1 + step % 100, loss=1.0 / (step + 1))
    assert len(curve.points) <= MAX_CURVE_POINTS and curve.stride > 1
    assert {p[1] for p in curve.points} == {1, 2}  # a new run starts at epoch 1, batch 1
    report = build_report({"id": "x", "state": "failed"}, {"curve": [[1, 1, 1, float("nan")]]})
    assert report["curve"][0]["loss"] is None and report["accuracy"]["top1_after"] is None
