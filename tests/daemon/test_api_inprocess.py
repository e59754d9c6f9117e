"""The REST API's contract, in process: `create_app` on a real Runtime (real model, SQLite buffer,
simulated telemetry) through Starlette's TestClient, with the fake cycle worker. Milliseconds per
request; tests/daemon/test_api.py checks the same contract against a real `edgetune serve`."""
from __future__ import annotations

import re

import pytest
from conftest import b64
from conftest import noise_png as png
from fastapi import APIRouter, Request
from pydantic import SecretStr

from daemon.api.routing import DirectRoute


def seed(d, n: int, start: int = 0) -> None:
    r = d.client.post("/samples", json={"samples": [{"image": b64(png(start + i)), "label": str(i % 3)} for i in range(n)]})
    assert r.status_code == 201, r.text


def test_health_ready_and_schema(inproc):
    c = inproc.client
    assert c.get("/healthz").json() == {"ok": True}
    assert c.get("/readyz").json() == {"ready": True, "model_version": "v0001"}
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/infer", "/samples", "/samples/{sample_id}/label", "/prune", "/cycles", "/cycles/{cycle_id}",
                 "/models", "/models/{version}/activate", "/status", "/metrics", "/healthz", "/readyz",
                 "/cycles/{cycle_id}/report", "/cycles/{cycle_id}/disagreements", "/samples/{sample_id}/image"):
        assert path in paths, path


def test_infer_raw_multipart_duplicate_and_bad_input(inproc):
    c = inproc.client
    r = c.post("/infer", content=png(1), params={"label": "4"}, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["buffered"] and body["model_version"] == "v0001" and body["sample_id"] == 1
    assert len(body["top"]) == 5 and body["top"][0].keys() == {"class", "index", "score"}
    assert body["top"][0]["score"] >= body["top"][1]["score"]
    assert body["buffer"] == "stored"  # labelled: committed before the answer
    r = c.post("/infer", files={"file": ("x.png", png(2), "image/png")})
    assert r.status_code == 200 and r.json()["buffer"] == "queued" and r.json()["sample_id"] is None
    assert r.json()["buffered"] is False  # queued behind the answer, not yet committed
    again = c.post("/infer", content=png(1), headers={"content-type": "image/png"}, params={"durable": "true"}).json()
    assert again["sample_id"] == 1 and again["buffered"] is False and again["buffer"] == "duplicate"
    for content, ctype, status, words in [(b"", "image/png", 400, "empty"), (b"junk", "image/jpeg", 400, "cannot decode"),
                                          (b"{}", "application/json", 415, "send an image"),
                                          (b"x" * (11 * 2**20), "image/png", 413, "max_upload_bytes")]:
        r = c.post("/infer", content=content, headers={"content-type": ctype})
        assert r.status_code == status and words in r.json()["detail"], (ctype, r.text)
    r = c.post("/infer", content=png(3), params={"label": "cat"}, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "unknown label 'cat'" in r.json()["detail"]
    inproc.settle()
    assert c.get("/status").json()["buffer"]["samples"] == 2
    metrics = c.get("/metrics").text
    assert 'edgetune_samples_ingested_total{source="infer"} 2.0' in metrics
    assert "edgetune_inference_latency_seconds_count 3.0" in metrics


def test_infer_body_is_the_documented_one_on_both_paths(inproc):
    """/infer writes its own JSON (a DirectRoute; no response-model validation): it must be what
    InferResponse writes, whether FastAPI parsed a query string or not, and stay documented."""
    from daemon.api.schemas import InferResponse

    c = inproc.client
    for params in ({}, {"durable": "false"}, {"durable": "1"}):
        r = c.post("/infer", content=png(7), headers={"content-type": "image/png"}, params=params)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        body = r.json()
        documented = InferResponse.model_validate(body).model_dump(mode="json", by_alias=True)
        assert body == documented and list(body) == list(documented), body
        assert body["buffer"] == ("duplicate" if params.get("durable") == "1" else "queued")
    r = c.post("/infer", content=png(7), headers={"content-type": "image/png"}, params={"durable": "maybe"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "durable"]  # FastAPI's own 422
    post = c.get("/openapi.json").json()["paths"]["/infer"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferResponse")
    assert {p["name"] for p in post["parameters"]} == {"label", "durable"}


def test_a_direct_route_takes_the_request_and_optional_query_parameters_only():
    r = APIRouter(route_class=DirectRoute)
    with pytest.raises(TypeError, match="required query parameter"):
        @r.post("/a")
        async def needs_a_query(request: Request, q: str): ...
    with pytest.raises(TypeError, match="Request and optional query parameters only"):
        @r.post("/b/{item}")
        async def takes_a_path_parameter(request: Request, item: int): ...


def test_labels(inproc):
    c = inproc.client
    sid = c.post("/infer", content=png(5), headers={"content-type": "image/png"}, params={"durable": "true"}).json()["sample_id"]
    r = c.post(f"/samples/{sid}/label", json={"label": "4"})
    assert r.status_code == 200 and r.json() == {"sample_id": sid, "label": "4"}
    assert c.get("/status").json()["buffer"]["per_class"] == {"4": 1}
    assert c.post(f"/samples/{sid}/label", json={"label": "cat"}).status_code == 422
    assert c.post("/samples/999999/label", json={"label": "4"}).status_code == 404
    assert c.post(f"/samples/{sid}/label", json={}).status_code == 422
    assert c.post("/samples/0/label", json={"label": "4"}).status_code == 422


def test_bulk_samples_all_or_nothing(inproc):
    c = inproc.client
    seed(inproc, 10)
    assert c.get("/status").json()["buffer"]["samples"] == 10
    r = c.post("/samples", json={"samples": [{"image": b64(png(100))}, {"image": "!!!"}]})
    assert r.status_code == 422 and "samples[1]" in r.json()["detail"]
    r = c.post("/samples", json={"samples": [{"image": b64(b"junk")}]})
    assert r.status_code == 422 and "samples[0]" in r.json()["detail"]
    r = c.post("/samples", json={"samples": [{"image": b64(png(101)), "label": "cat"}]})
    assert r.status_code == 422
    assert c.post("/samples", json={"samples": []}).status_code == 422
    assert c.get("/status").json()["buffer"]["samples"] == 10  # nothing half-stored
    r = c.post("/samples", json={"samples": [{"image": b64(png(0))}, {"image": b64(png(200))}]})
    assert r.status_code == 201 and r.json()["stored"] == 1 and r.json()["duplicates"] == 1


@pytest.mark.parametrize("body,words", [
    ({"level": 1.5}, "level must be 'auto' or a fraction between 0 and 1"),
    ({"level": 0}, "level must be"),
    ({"criterion": "nope"}, "nope"),
    ({"criterion": "taylor,taylor"}, "twice"),
    ({"allocation": "uniform,sideways"}, "unknown allocation 'sideways'"),
])
def test_prune_options_are_checked_by_the_one_validator(inproc, body, words):
    r = inproc.client.post("/prune", json=body)
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert inproc.client.get("/cycles").json() == []


def test_prune_202_then_409_and_the_cycle_resources(inproc):
    c = inproc.client
    assert c.post("/prune", json={"epochs": -1}).status_code == 422
    assert c.post("/prune", json={"level": "most"}).status_code == 422
    r = c.post("/prune", json={"level": 0.3, "criterion": "l1", "allocation": "global", "epochs": 2})
    assert r.status_code == 202, r.text
    cycle_id = r.json()["cycle_id"]
    assert r.json()["state"] == "queued" and r.headers["location"] == f"/cycles/{cycle_id}"
    r = c.post("/prune")
    assert r.status_code == 409 and cycle_id in r.json()["detail"]
    assert c.get("/prune").status_code == 409
    record = c.get(f"/cycles/{cycle_id}").json()
    assert record["request"] == {"level": 0.3, "criterion": "l1", "allocation": "global", "epochs": 2, "force": False}
    assert record["state"] == "queued" and record["trigger"] == "api"
    assert [x["id"] for x in c.get("/cycles").json()] == [cycle_id]
    assert c.get("/cycles", params={"limit": 0}).status_code == 422
    r = c.get("/cycles/nope")
    assert r.status_code == 404 and r.json()["detail"] == "no cycle 'nope'"
    assert c.get("/status").json()["cycle"]["id"] == cycle_id
    r = c.post("/models/v0001/activate")
    assert r.status_code == 409 and "activate after it ends" in r.json()["detail"]


def test_guard_refuses_cross_site_and_demands_the_token(inproc, monkeypatch):
    c = inproc.client
    assert c.get("/prune", headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.get("/prune", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    r = c.post("/prune", headers={"Origin": "http://evil.example"}, json={})
    assert r.status_code == 403 and r.json()["detail"] == "cross-site request refused"
    assert c.post("/prune", headers={"Origin": "http://testserver"}, json={"level": 1.5}).status_code == 422  # same site
    monkeypatch.setattr(inproc.rt.settings, "api_token", SecretStr("s3cret"))
    r = c.post("/samples", json={"samples": [{"image": b64(png(1))}]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.post("/models/v0001/activate", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/status").status_code == 200 and c.get("/cycles").status_code == 200  # reads need none
    r = c.post("/samples", json={"samples": [{"image": b64(png(1))}]}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 201
    assert c.get("/cycles").json() == []
    assert 'edgetune_requests_total{endpoint="unmatched",method="POST",status="401"}' in c.get("/metrics").text


def test_models_and_activate(inproc):
    c = inproc.client
    models = c.get("/models").json()
    assert [m["version"] for m in models] == ["v0001"] and models[0]["active"] and models[0]["arch"] == "cifar_small"
    r = c.post("/models/v9999/activate")
    assert r.status_code == 404 and r.json()["detail"] == "no model version 'v9999'"
    assert c.post("/models/latest/activate").status_code == 422
    r = c.post("/models/v0001/activate")
    assert r.status_code == 200 and r.json()["active"] == "v0001" and r.json()["params"] == models[0]["params"]
    assert "edgetune_swaps_total 1.0" in c.get("/metrics").text


def test_status_and_metrics(inproc):
    inproc.tick()
    status = inproc.client.get("/status").json()
    assert set(status) == {"model", "buffer", "scheduler", "telemetry", "cycle", "label_shift"}
    shift = status["label_shift"]
    assert shift["estimate"] is None and not shift["applied"] and shift["reason"].startswith("estimating")
    assert shift["source_prior"]["0"] == 0.1 and shift["generalist"] == {"version": "v0001", "watching": False, "estimate": None}
    assert status["model"]["version"] == "v0001" and status["model"]["arch"] == "cifar_small"
    assert status["cycle"] is None
    s = status["scheduler"]
    assert s["state"] == "idle" and s["thermal_ok"] and s["idle"] and not s["samples_ok"] and not s["gate_open"]
    assert s["why_not_running"] == ["not enough samples: 0 < 3"] and s["consecutive_failures"] == 0
    assert status["telemetry"]["provider"] == "simulated" and status["telemetry"]["max_temperature_c"] == 45.0
    assert status["telemetry"]["limits"]["thermal_limit_c"] == 75.0
    text = inproc.client.get("/metrics").text
    for name in ("edgetune_requests_total", "edgetune_request_latency_seconds_bucket", "edgetune_buffer_samples",
                 "edgetune_model_params", "edgetune_temperature_celsius", "edgetune_power_watts", "edgetune_gate_open",
                 'edgetune_class_prior{class="0",estimator="source"}', "edgetune_prior_correction_applied"):
        assert name in text, name
    assert re.search(r'^edgetune_model_info\{arch="cifar_small",version="v0001"\} 1\.0$', text, re.M)
    assert re.search(r"^edgetune_temperature_max_celsius 45\.0$", text, re.M)
    assert all(line.startswith(("#", "edgetune_")) for line in text.splitlines() if line)


def test_a_full_sample_queue_drops_samples_never_requests(make_inproc):
    d = make_inproc(sample_queue_size=3)
    c = d.client
    with d.rt.buffer._lock:  # the writer is stuck in a commit (a slow disk): nothing leaves the queue
        bodies = [c.post("/infer", content=png(k), headers={"content-type": "image/png"}) for k in range(8)]
        assert [r.status_code for r in bodies] == [200] * 8
        assert [r.json()["buffer"] for r in bodies] == ["queued"] * 3 + ["dropped"] * 5
        assert all(r.json()["top"] and r.json()["sample_id"] is None and not r.json()["buffered"] for r in bodies)
        assert d.rt.buffer.queued == 3  # (/status would wait for the stuck writer's lock)
    d.settle()  # the disk caught up: the queued ones are committed, the dropped ones were never kept
    buffer = c.get("/status").json()["buffer"]
    assert buffer["samples"] == 3 and buffer["queued"] == 0
    metrics = c.get("/metrics").text
    assert 'edgetune_samples_dropped_total{reason="queue_full"} 5.0' in metrics
    assert 'edgetune_samples_ingested_total{source="infer"} 3.0' in metrics
    r = c.post("/infer", content=png(100), headers={"content-type": "image/png"})
    assert r.json()["buffer"] == "queued"  # room again


def test_a_failed_background_commit_counts_the_sample_as_dropped(make_inproc):
    from daemon.storage.buffer import BufferFull

    d = make_inproc()
    real = d.rt.buffer.add_many

    def full(samples):
        raise BufferFull("sample buffer full: no space left in the state directory (simulated)")

    d.rt.buffer.add_many = full  # the disk refuses the group commit
    r = d.client.post("/infer", content=png(1), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["buffer"] == "queued"
    d.settle()
    r = d.client.post("/infer", content=png(2), headers={"content-type": "image/png"}, params={"label": "4"})
    assert r.status_code == 200 and r.json()["buffer"] == "failed" and "no space left" in r.json()["buffer_error"]
    d.rt.buffer.add_many = real
    assert 'edgetune_samples_dropped_total{reason="storage_error"} 1.0' in d.client.get("/metrics").text
