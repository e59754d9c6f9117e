"""The REST API's contract and its answers to bad requests (real uvicorn process)."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # a real `edgetune serve`; test_api_inprocess.py is the fast twin


@pytest.fixture(scope="module")
def api(shared_daemon):
    return shared_daemon


def _png(color=(255, 255, 255), size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, "PNG")
    return buf.getvalue()


def test_health_and_docs(api):
    assert api.client.get("/healthz").json() == {"ok": True}
    assert api.client.get("/readyz").json() == {"ready": True, "model_version": "v0001"}
    schema = api.client.get("/openapi.json").json()
    for path in ("/infer", "/samples", "/samples/{sample_id}/label", "/prune", "/cycles", "/cycles/{cycle_id}",
                 "/models", "/models/{version}/activate", "/status", "/metrics", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    assert api.client.get("/docs").status_code == 200


def test_infer_raw_and_multipart(api, device_images):
    data, label = device_images[0]
    r = api.infer(data, label)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"sample_id", "top", "model_version", "latency_ms", "buffered", "buffer"}
    assert body["buffered"] and body["buffer"] == "stored"  # labelled: committed before the answer
    assert body["top"][0].keys() == {"class", "index", "score"}
    assert len(body["top"]) == 5 and body["top"][0]["score"] >= body["top"][1]["score"]
    r = api.client.post("/infer", files={"file": ("x.png", device_images[1][0], "image/png")})
    assert r.status_code == 200 and r.json()["buffer"] == "queued" and r.json()["sample_id"] is None
    again = api.client.post("/infer", content=data, params={"durable": "true"}, headers={"content-type": "image/png"})
    assert again.json()["sample_id"] == body["sample_id"] and again.json()["buffered"] is False  # not stored twice
    assert again.json()["buffer"] == "duplicate"


@pytest.mark.parametrize(
    "content,ctype,status,words",
    [
        (b"", "image/png", 400, "empty"),
        (b"not an image at all", "image/jpeg", 400, "cannot decode"),
        (_png()[:40], "image/png", 400, "cannot decode"),
        (b"{}", "application/json", 415, "send an image"),
        (b"x" * (11 * 2**20), "image/png", 413, "max_upload_bytes"),
    ],
    ids=["empty", "garbage", "truncated", "json", "oversize"],
)
def test_infer_bad_input(api, content, ctype, status, words):
    r = api.client.post("/infer", content=content, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_infer_odd_modes(api, mode):
    img = Image.new(mode, (50, 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert api.client.post("/infer", content=buf.getvalue(), headers={"content-type": "image/png"}).status_code == 200


def test_labels(api, device_images):
    r = api.client.post("/infer", content=device_images[5][0], params={"durable": "true"}, headers={"content-type": "image/png"})
    sid = r.json()["sample_id"]
    r = api.client.post(f"/samples/{sid}/label", json={"label": "4"})
    assert r.status_code == 200 and r.json() == {"sample_id": sid, "label": "4"}
    assert api.client.post(f"/samples/{sid}/label", json={"label": "cat"}).status_code == 422
    assert api.client.post("/samples/999999/label", json={"label": "4"}).status_code == 404
    assert api.client.post(f"/samples/{sid}/label", json={}).status_code == 422
    assert api.infer(device_images[6][0], label="no-such-class").status_code == 422


def test_bulk_samples(api, device_images):
    payload = {"samples": [{"image": base64.b64encode(d).decode(), "label": l} for d, l in device_images[10:20]]}
    payload["samples"].append({"image": base64.b64encode(device_images[20][0]).decode()})
    before = api.client.get("/status").json()["buffer"]["samples"]
    r = api.client.post("/samples", json=payload)
    assert r.status_code == 201, r.text
    assert r.json()["stored"] == 11 and len(r.json()["sample_ids"]) == 11
    assert api.client.get("/status").json()["buffer"]["samples"] == before + 11
    bad = {"samples": [{"image": base64.b64encode(device_images[21][0]).decode()}, {"image": "!!!"}]}
    r = api.client.post("/samples", json=bad)
    assert r.status_code == 422 and "samples[1]" in r.json()["detail"]
    assert api.client.get("/status").json()["buffer"]["samples"] == before + 11  # nothing half-stored
    r = api.client.post("/samples", json={"samples": [{"image": base64.b64encode(b"junk").decode()}]})
    assert r.status_code == 422


def test_prune_validation_and_cross_site(api):
    assert api.client.post("/prune", json={"level": 1.5}).status_code == 422
    assert api.client.post("/prune", json={"criterion": "nope"}).status_code == 422
    r = api.client.post("/prune", json={"criterion": "taylor,taylor"})
    assert r.status_code == 422 and "twice" in r.json()["detail"]
    r = api.client.post("/prune", json={"allocation": "uniform,sideways"})
    assert r.status_code == 422 and "unknown allocation 'sideways'" in r.json()["detail"]
    assert api.client.post("/prune", json={"epochs": -1}).status_code == 422
    assert api.client.get("/prune", headers={"Origin": "http://evil.example"}).status_code == 403
    assert api.client.get("/prune", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert api.client.post("/prune", headers={"Origin": "http://evil.example"}, json={}).status_code == 403
    assert api.client.get("/cycles").json() == []  # none of the refused requests started a cycle
    assert api.client.get("/cycles/nope").status_code == 404


def test_models_and_activate_validation(api):
    models = api.client.get("/models").json()
    assert models[0]["version"] == "v0001" and models[0]["active"]
    assert api.client.post("/models/v9999/activate").status_code == 404
    assert api.client.post("/models/..%2f..%2fetc/activate").status_code in (404, 422)
    assert api.client.post("/models/v0001/activate").status_code == 200


def test_status_and_metrics_shape(api):
    status = api.client.get("/status").json()
    assert set(status) == {"model", "buffer", "scheduler", "telemetry", "cycle", "label_shift"}
    assert set(status["scheduler"]) >= {"state", "idle", "thermal_ok", "power_ok", "why_not_running"}
    assert status["telemetry"]["provider"] == "simulated" and status["telemetry"]["max_temperature_c"] == 45.0
    text = api.client.get("/metrics").text
    for name in ("edgetune_requests_total", "edgetune_request_latency_seconds_bucket", "edgetune_buffer_samples",
                 "edgetune_model_params", "edgetune_model_macs", "edgetune_temperature_celsius", "edgetune_power_watts",
                 "edgetune_gate_open", "edgetune_inference_latency_seconds_count"):
        assert name in text, name
    assert all(line.startswith(("#", "edgetune_")) for line in text.splitlines() if line)
