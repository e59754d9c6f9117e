"""A pending candidate in process: kept in staging, its disagreements asked through the API, each
label judging it again (accepted → installed, rejected → removed), the timeout, and bad input. The
stand-in worker's candidate disagrees with the teacher on every held-out sample (fake_worker)."""
from __future__ import annotations

import time

import pytest
from fake_worker import fake_worker_disagreeing

from conftest import b64
from test_api_inprocess import png

FINAL = ("accepted", "rejected", "failed", "aborted")


@pytest.fixture
def pending(make_inproc):
    d = make_inproc(worker_target=fake_worker_disagreeing, holdout_fraction=0.5, disagreement_labels=20)
    r = d.client.post("/samples", json={"samples": [{"image": b64(png(i))} for i in range(60)]})  # unlabelled
    assert r.status_code == 201, r.text
    cycle_id = d.client.post("/prune", json={"level": 0.5}).json()["cycle_id"]
    record = d.run_until(cycle_id, lambda r: r["state"] in FINAL + ("pending",))
    assert record["state"] == "pending", record
    return d, record


def _asked(d, cycle_id: str) -> list[dict]:
    r = d.client.get(f"/cycles/{cycle_id}/disagreements")
    assert r.status_code == 200, r.text
    return r.json()["asked"]


def test_a_pending_candidate_asks_for_its_disagreements_and_labels_accept_it(pending):
    d, record = pending
    c = d.client
    assert record["reason"].startswith("pending:") and record["pending_since"] is not None
    assert c.get("/status").json()["scheduler"]["state"] == "pending"
    assert c.post("/prune", json={}).status_code == 409  # one candidate at a time
    body = c.get(f"/cycles/{record['id']}/disagreements").json()
    assert body["state"] == "pending" and body["classes"][:2] == ["0", "1"] and body["judging_samples"] == body["disagreements"]
    asked = body["asked"]
    assert len(asked) == 20 and {a["teacher"] for a in asked} == {"0"} and {a["candidate"] for a in asked} == {"1"}
    image = c.get(asked[0]["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content.startswith(b"\x89PNG")
    # the label of a sample that was not asked for changes nothing
    others = [i for i in range(1, 61) if i not in {a["sample_id"] for a in asked}]
    assert c.post(f"/samples/{others[0]}/label", json={"label": "1"}).status_code == 200
    assert d.cycle(record["id"])["state"] == "pending"
    for n, item in enumerate(asked, start=1):
        r = c.post(f"/samples/{item['sample_id']}/label", json={"label": item["candidate"]})
        assert r.json() == {"sample_id": item["sample_id"], "label": "1"}
        state = d.cycle(record["id"])["state"]
        if state != "pending":
            break
    record = d.cycle(record["id"])
    assert record["state"] == "accepted" and n < 20, record
    assert record["version_after"] == "v0002" and "asked disagreements labelled" in record["reason"]
    assert c.get("/status").json()["model"]["version"] == "v0002"
    assert [a["label"] for a in _asked(d, record["id"])][:n] == ["1"] * n


def test_labels_that_side_with_the_teacher_reject_it_and_remove_the_candidate(pending):
    d, record = pending
    staging = list((d.rt.settings.models_dir).glob(".staging-*"))
    assert len(staging) == 1
    for item in _asked(d, record["id"]):
        d.client.post(f"/samples/{item['sample_id']}/label", json={"label": item["teacher"]})
        if d.cycle(record["id"])["state"] != "pending":
            break
    record = d.cycle(record["id"])
    assert record["state"] == "rejected" and "worse than max_accuracy_drop" in record["reason"], record
    assert not staging[0].exists() and d.client.get("/status").json()["model"]["version"] == "v0001"


def test_a_pending_candidate_times_out(pending):
    d, record = pending
    d.clock.advance(d.rt.settings.pending_timeout_s - 1)
    d.tick()
    assert d.cycle(record["id"])["state"] == "pending"
    d.clock.advance(2)
    d.tick()
    record = d.cycle(record["id"])
    assert record["state"] == "rejected" and record["reason"].startswith("timed out: pending longer than pending_timeout_s")
    assert not list(d.rt.settings.models_dir.glob(".staging-*"))
    assert d.client.post("/prune", json={}).status_code == 202  # the next cycle may start
    deadline = time.monotonic() + 30  # the report is written in a background thread
    while (r := d.client.get(f"/cycles/{record['id']}/report")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    evidence = r.json()["paired_evidence"]
    assert evidence["asked"] == 20 and evidence["disagreements"] == evidence["samples"] > 20 and evidence["expected_loss"] == 0.5


def test_activating_a_version_rejects_the_pending_candidate(pending):
    d, record = pending
    assert d.client.post("/models/v0001/activate").status_code == 200
    record = d.cycle(record["id"])
    assert record["state"] == "rejected" and record["reason"].startswith("version v0001 was activated while the candidate was pending")


def test_bad_input_is_refused_and_loses_nothing(pending):
    d, record = pending
    c = d.client
    asked = _asked(d, record["id"])
    assert c.get("/cycles/nope/disagreements").status_code == 404
    assert c.get("/samples/99999/image").status_code == 404
    assert c.get("/samples/0/image").status_code == 422
    first = asked[0]["sample_id"]
    r = c.post(f"/samples/{first}/label", json={"label": "no such class"})
    assert r.status_code == 422 and "no such class" in r.text
    assert c.post(f"/samples/{first}/label", json={}).status_code == 422
    assert c.post("/samples/99999/label", json={"label": "1"}).status_code == 404
    assert d.cycle(record["id"])["state"] == "pending" and _asked(d, record["id"])[0]["label"] is None
    assert c.get(f"/cycles/{record['id']}/disagreements").json()["asked"] == asked  # nothing changed


def test_labels_given_through_bulk_ingest_count_at_the_next_poll(pending):
    """A label can also arrive with the same image posted again (POST /samples): the next poll sees it."""
    d, record = pending
    asked = _asked(d, record["id"])
    again = [{"image": b64(d.client.get(a["image_url"]).content), "label": a["candidate"]} for a in asked]
    r = d.client.post("/samples", json={"samples": again})
    assert r.status_code == 201 and r.json()["duplicates"] == len(asked)
    assert d.cycle(record["id"])["state"] == "pending"
    d.tick()
    record = d.cycle(record["id"])
    assert record["state"] == "accepted" and record["version_after"] == "v0002", record
