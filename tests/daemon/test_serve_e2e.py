"""End to end against a real `edgetune serve`: infer, buffer, prune, accept, hot-swap, metrics."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow  # real daemons and workers; test_cycles_inprocess.py is the fast twin


def _feed(daemon, images, n=None) -> list[int]:
    ids = []
    for data, label in images[:n]:
        r = daemon.infer(data, label)
        assert r.status_code == 200, r.text
        ids.append(r.json()["sample_id"])
    return ids


def test_cycle_is_accepted_and_swapped_in(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_CYCLE_ALLOCATION": "global", "EDGETUNE_SERVING_BACKEND": "auto"}).start()
    before = d.client.get("/status").json()
    assert before["model"]["version"] == "v0001"

    ids = _feed(d, device_images, 240)
    assert len(set(ids)) == 240
    status = d.client.get("/status").json()
    assert status["buffer"]["samples"] == 240 and status["buffer"]["labelled"] == 240
    assert set(status["buffer"]["per_class"]) == {"1", "4", "7"}
    assert status["telemetry"]["provider"] == "simulated"

    r = d.client.post("/prune", json={"level": 0.5, "epochs": 3, "allocation": "uniform"})
    assert r.status_code == 202, r.text
    cycle_id = r.json()["cycle_id"]
    assert d.client.post("/prune").status_code == 409  # one cycle at a time
    record = d.wait_cycle(cycle_id, ("accepted", "rejected", "failed", "aborted"))
    assert record["state"] == "accepted", record
    m = record["metrics"]
    assert m["params_after"] < m["params_before"]
    # the worker judged on held-out samples that chose nothing (cycle_judge_share)
    assert m["chosen_by"] == m["evidence"] == "labels" and 0 < m["held_out_samples"] and 0 < m["choosing_samples"], m
    assert record["version_before"] == "v0001" and record["version_after"] == "v0002"
    # the worker built and verified the candidate's onnxruntime engine; the swap loaded it
    engines = {e["backend"]: e for e in record["engines"]}
    assert engines["onnxruntime"]["built"] and engines["onnxruntime"]["verification"]["top1_mismatches"] == 0, record["engines"]

    after = d.client.get("/status").json()
    assert after["model"]["version"] == "v0002" and after["model"]["serving"]["backend"] == "onnxruntime"
    assert after["model"]["params"] < before["model"]["params"]
    assert after["model"]["macs"] < before["model"]["macs"]

    metrics = d.client.get("/metrics").text
    assert re.search(r'^edgetune_cycles_total\{outcome="accepted"\} 1\.0$', metrics, re.M)
    assert re.search(r'^edgetune_model_info\{arch="cifar_small",version="v0002"\} 1\.0$', metrics, re.M)
    assert re.search(r"^edgetune_swaps_total 1\.0$", metrics, re.M)
    assert re.search(r'^edgetune_requests_total\{endpoint="/infer",method="POST",status="200"\} 24\d\.0$', metrics, re.M)

    # inference still answers, now from the pruned model, and correctly
    held = device_images[240:300]
    hits = 0
    for data, label in held:
        body = d.infer(data).json()
        assert body["model_version"] == "v0002"
        hits += body["top"][0]["class"] == label
    assert hits / len(held) >= 0.9

    models = d.client.get("/models").json()
    assert [m["version"] for m in models] == ["v0002", "v0001"]
    assert models[0]["active"] and models[0]["lineage"]["parent"] == "v0001"
    assert models[0]["lineage"]["allocation"] == "uniform" == record["request"]["allocation"]  # the request's, not the configured one

    # the active version survives a restart
    d.stop()
    d.start()
    assert d.client.get("/status").json()["model"]["version"] == "v0002"
    assert d.client.get("/status").json()["model"]["serving"]["backend"] == "onnxruntime"  # the cached engine, reused

    # roll back
    r = d.client.post("/models/v0001/activate")
    assert r.status_code == 200, r.text
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    assert d.infer(held[0][0]).json()["model_version"] == "v0001"


def test_rejected_cycle_leaves_served_model_untouched(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_MIN_SIZE_GAIN": "0.9"}).start()
    _feed(d, device_images, 90)
    cycle_id = d.client.post("/prune", json={"level": 0.5, "epochs": 1, "force": True}).json()["cycle_id"]
    record = d.wait_cycle(cycle_id, ("accepted", "rejected", "failed", "aborted"))
    assert record["state"] == "rejected" and "min_size_gain" in record["reason"]
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    assert [m["version"] for m in d.client.get("/models").json()] == ["v0001"]
    assert not list((d.state_dir / "models").glob(".staging-*"))  # no candidate left behind
