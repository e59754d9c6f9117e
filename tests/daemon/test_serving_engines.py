"""Serving through engines, in process (real Runtime, real onnxruntime on the CPU, real torch models,
TestClient): an engine is built before it serves (by the cycle worker, or in the background while
torch serves), reused at start-up while it fits, rebuilt when it does not, and every backend that
does not serve says why."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import InProcess, b64

from daemon.engines import Backend, Precision, trt
from daemon.engines.base import ENGINE_JSON
from daemon.engines.eager import TorchEngine
from daemon.engines.verify import TOLERANCES
from daemon.serving.serving import load_served
from fake_worker import fake_worker_building_engines, fake_worker_engine_build_fails

REBUILD_TIMEOUT_S = 300  # a generous bound on one background build (spawn, torch import, export, verify)
TRT_MISSING = trt.available()


def serving(d: InProcess) -> dict:
    return d.client.get("/status").json()["model"]["serving"]


def seed_digits(d: InProcess, device_images, n: int = 40) -> None:
    samples = [{"image": b64(png), "label": label} for png, label in device_images[:n]]
    r = d.client.post("/samples", json={"samples": samples})
    assert r.status_code == 201, r.text


def rebuilt(d: InProcess) -> dict:
    assert d.rt.rebuilder.wait_idle(REBUILD_TIMEOUT_S), "the background rebuild did not finish"
    return serving(d)


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def installs(caplog) -> list[str]:
    """The installer's "serving <version> through <engine> …; <why not the others>" lines, in order
    (the record of what served first, free of any race with the background build)."""
    lines = [r.getMessage() for r in caplog.records if r.name == "edgetune.installer" and r.getMessage().startswith("serving ")]
    caplog.clear()
    return lines


@pytest.mark.slow
def test_start_up_builds_in_the_background_reuses_and_rebuilds_a_damaged_engine(state, base_model_dir, digits, device_images, caplog):
    """Imported model: torch serves at once while its engine is built in the background, then
    onnxruntime serves with torch's top-1. A restart reuses the engine; a corrupt engine.json or an
    altered engine file is reported, torch serves, and the rebuilt engine is swapped in."""
    caplog.set_level("INFO", logger="edgetune.installer")
    d = InProcess(state, base_model_dir, serving_backend="auto")
    try:
        seed_digits(d, device_images)  # the rebuild may or may not see these: either is verified
        after = rebuilt(d)
        first, upgraded = installs(caplog)
        assert first.startswith("serving v0001 through torch") and "onnxruntime: not_built: no onnxruntime engine in v0001" in first
        assert upgraded.startswith("serving v0001 through onnxruntime (CPUExecutionProvider")
        assert after["backend"] == "onnxruntime" and "CPUExecutionProvider" in after["engine"] and after["latency_ms"] > 0
        last = after["rebuild"]["last"]
        assert last["version"] == "v0001" and [e["backend"] for e in last["engines"]][-1] == "onnxruntime"
        assert last["engines"][-1]["built"] and last["engines"][-1]["verification"]["top1_mismatches"] == 0
        if not TRT_MISSING[0]:  # a runtime that is not installed is a reason, not something to rebuild
            assert TRT_MISSING[1] in after["skipped"]["tensorrt"] and len(last["engines"]) == 1
        assert after["skipped"]["torch"].startswith("not timed")
        served = d.rt.served()
        assert served.backend is Backend.ONNXRUNTIME
        images = digits.images[:64].numpy()
        torch_engine = TorchEngine(*load_torch(base_model_dir))
        want, got = torch_engine.logits(images), served.logits(images)
        allowed = TOLERANCES[Precision.FP32].allowed(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=allowed)
        top2 = np.sort(want, 1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * allowed
        assert decisive.mean() > 0.9 and len(set(want.argmax(1).tolist())) > 1
        assert (got.argmax(1) == want.argmax(1))[decisive].all()
        answers = served.predict(images, top_k=3, track=False)
        assert [a.top[0][0] for a in answers] == got.argmax(1).tolist()
        r = d.client.post("/infer", content=device_images[0][0], headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["model_version"] == "v0001"
        metrics = d.client.get("/metrics").text
        assert re.search(r'^edgetune_serving_backend_info\{backend="onnxruntime",engine=".*CPUExecutionProvider.*"\} 1\.0$', metrics, re.M)
        assert re.search(r'^edgetune_engine_builds_total\{backend="onnxruntime",outcome="built"\} 1\.0$', metrics, re.M)
        assert re.search(r"^edgetune_swaps_total 0\.0$", metrics, re.M)  # an engine upgrade is not a model swap
    finally:
        d.close()

    version_dir = state / "models" / "v0001"
    # one damage here (each costs a rebuild); tests/daemon/test_engines.py checks that every kind is detected
    for damage, words in [(lambda: (version_dir / ENGINE_JSON).write_text("{not json"), "unreadable")]:
        d = InProcess(state, base_model_dir, serving_backend="auto")
        try:
            assert serving(d)["backend"] == "onnxruntime"  # reused, not rebuilt
            assert d.rt.rebuilder.view() == {"building": None, "queued": [], "last": None}
        finally:
            d.close()
        damage()
        caplog.clear()
        d = InProcess(state, base_model_dir, serving_backend="auto")
        try:
            r = d.client.post("/infer", content=device_images[1][0], headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert rebuilt(d)["backend"] == "onnxruntime"
            first, upgraded = installs(caplog)
            assert first.startswith("serving v0001 through torch") and words in first, first
            assert upgraded.startswith("serving v0001 through onnxruntime")
        finally:
            d.close()


def load_torch(model_dir):
    from prune_core import load_model
    from daemon.engines import InputSpec

    model, card = load_model(model_dir)
    return model, InputSpec.of(card), torch.device("cpu")


def run_cycle(d: InProcess) -> dict:
    cycle_id = d.client.post("/prune", json={"level": 0.5, "epochs": 2, "force": True}).json()["cycle_id"]
    record = d.run_until(cycle_id, lambda r: r["state"] in ("accepted", "rejected", "failed", "aborted"))
    assert d.client.get(f"/cycles/{cycle_id}").json() == record
    return record


@pytest.mark.slow
def test_a_cycle_builds_its_candidates_engine_before_the_swap_or_records_why_not(state, base_model_dir, device_images):
    """The worker builds and verifies the candidate's engine in staging; the swap loads it: the new
    version serves through onnxruntime at once, with no background rebuild. When the build fails,
    the version is still installed, served by torch, the reason is in the cycle record and the
    build is not retried in the background."""
    d = InProcess(state, base_model_dir, serving_backend="onnxruntime", worker_target=fake_worker_building_engines)
    try:
        rebuilt(d)  # v0001's own engine, built at start-up
        seed_digits(d, device_images)
        record = run_cycle(d)
        assert record["state"] == "accepted" and record["version_after"] == "v0002", record
        [engine] = record["engines"]
        assert engine["backend"] == "onnxruntime" and engine["built"] and engine["reason"] is None
        v = engine["verification"]
        assert v["images"] > 0 and v["top1_mismatches"] == 0 and v["max_abs_diff"] <= v["allowed_diff"]
        now = serving(d)
        assert d.rt.served().version == "v0002" and now["backend"] == "onnxruntime", now
        assert now["rebuild"]["building"] is None and now["rebuild"]["queued"] == []
        assert now["rebuild"]["last"]["version"] == "v0001"  # v0002 needed no rebuild
        assert json.loads((state / "models" / "v0002" / ENGINE_JSON).read_text())["engines"]["onnxruntime"]["verification"]["images"] == v["images"]

        d.rt.scheduler.worker.target = fake_worker_engine_build_fails
        record = run_cycle(d)
        assert record["state"] == "accepted" and record["version_after"] == "v0003", record  # still installable
        assert record["engines"] == [{"backend": "onnxruntime", "built": False, "reason": "forced by the test: the builder refuses",
                                      "verification": None, "precision": None, "build_seconds": None}]
        now = serving(d)
        assert d.rt.served().version == "v0003" and now["backend"] == "torch"
        assert "no onnxruntime engine in v0003" in now["skipped"]["onnxruntime"]
        assert now["rebuild"]["queued"] == [] and now["rebuild"]["building"] is None  # the worker tried: not retried here
        r = d.client.post("/infer", content=device_images[0][0], headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["model_version"] == "v0003"
    finally:
        d.close()


def test_tensorrt_setting_without_tensorrt_serves_torch_and_says_why(make_inproc):
    ok, why = TRT_MISSING
    if ok:
        pytest.skip(f"TensorRT is installed here ({why}): this test is about a machine without it")
    d = make_inproc(serving_backend="tensorrt")
    now = serving(d)
    assert now["backend"] == "torch" and now["skipped"]["tensorrt"] == f"not_installed: {why}"
    assert now["skipped"]["onnxruntime"] == "serving_backend = tensorrt"
    assert now["rebuild"] == {"building": None, "queued": [], "last": None}  # nothing to build without TensorRT
    assert d.client.post("/infer", content=b"", headers={"content-type": "image/png"}).status_code == 400


def test_torch_setting_and_the_served_contract(untrained_model_dir):
    """serving_backend = torch: the model itself; predict takes numpy uint8 and answers top-k."""
    served = load_served("v0001", untrained_model_dir, "cpu", backend="torch")
    assert served.backend is Backend.TORCH and served.selection.skipped.keys() == {Backend.ONNXRUNTIME, Backend.TENSORRT}
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    logits = served.logits(images)
    assert logits.dtype == np.float32 and logits.shape == (4, 10)
    answers = served.predict(images, top_k=3, track=False)
    assert [len(a.top) for a in answers] == [3] * 4
    assert [a.top[0][0] for a in answers] == logits.argmax(1).tolist() == [a.raw_pred for a in answers]
    with pytest.raises(ValueError, match="uint8"):
        served.predict(images.astype(np.float32))
