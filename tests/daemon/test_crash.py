"""Crash consistency, for real: a running `edgetune serve` is killed with SIGKILL at seeded random
moments (during ingest, during a cycle's ranking, training, model writing and install, and during
activations) and restarted on the same state dir. After every restart:

- every sample whose POST got a 2xx with the sample stored (bulk ingest, and /infer with a label)
  is in the buffer (by content hash), and nothing else is; an unlabelled /infer sample is queued
  behind its answer (`"buffer": "queued"`) and may be lost by a kill, never invented;
- the served model answers /infer, and the active version is one that was accepted;
- no version directory exists that was not accepted; no cycle is left unfinished, and an
  interrupted one is failed with a reason (or completed, when it died mid-install);
- no temp, staging or trash files are left in the state dir, and no worker outlived the daemon.

EDGETUNE_CRASH_SEED picks the kill moments (default fixed); EDGETUNE_CRASH_KILLS the total
number of kills across this module (default 50).
"""
from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # kills real daemons with SIGKILL

SEED = int(os.environ.get("EDGETUNE_CRASH_SEED", "20240607"))
KILLS = int(os.environ.get("EDGETUNE_CRASH_KILLS", "50"))
CYCLE_KILLS = max(4, round(KILLS * 0.14))
SWAP_KILLS = max(3, round(KILLS * 0.12))
INGEST_KILLS = max(1, KILLS - CYCLE_KILLS - SWAP_KILLS)
FINAL = ("accepted", "rejected", "failed", "aborted")
LEFTOVER_PREFIXES = (".staging-", ".trash-", ".active.")
CYCLE_ENV = {"EDGETUNE_CYCLE_MIN_STEPS": "0", "EDGETUNE_CYCLE_EPOCHS": "1", "EDGETUNE_CYCLE_LEVEL": "0.3",
             "EDGETUNE_MAX_ACCURACY_DROP": "1.0", "EDGETUNE_MIN_SIZE_GAIN": "0.0", "EDGETUNE_KEEP_VERSIONS": "3",
             "EDGETUNE_BUFFER_MAX_ROWS": "100000"}


def noise_png(rng: random.Random) -> bytes:
    pixels = np.frombuffer(rng.randbytes(32 * 32 * 3), dtype=np.uint8).reshape(32, 32, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Ingest:
    """Client threads posting unique images until stopped: bulk /samples, unlabelled /infer
    (queued behind the answer) and labelled /infer (committed before it); `acked` holds the
    hashes of images whose POST was answered 2xx with the sample stored."""

    def __init__(self, url: str, rng: random.Random, threads: int = 3):
        self.url = url
        self.images = [[noise_png(rng) for _ in range(250)] for _ in range(threads)]
        self.sent = {sha(b) for part in self.images for b in part}
        self.acked: set[str] = set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def run(self, k: int) -> None:
        images = self.images[k]
        with httpx.Client(base_url=self.url, timeout=10) as client:
            i = 0
            while not self.stop.is_set() and i < len(images):
                try:
                    if k == 0:  # bulk ingest, 4 per request
                        batch = images[i : i + 4]
                        i += 4
                        r = client.post("/samples", json={"samples": [{"image": base64.b64encode(b).decode()} for b in batch]})
                        if r.status_code == 201:
                            self.acked.update(sha(b) for b in batch)
                    else:  # thread 1 unlabelled (queued: never acked), the others labelled (durable)
                        data = images[i]
                        i += 1
                        params = {} if k == 1 else {"label": str(i % 10)}
                        r = client.post("/infer", content=data, params=params, headers={"content-type": "image/png"})
                        if r.status_code == 200 and r.json()["buffered"]:
                            self.acked.add(sha(data))
                except httpx.HTTPError:
                    time.sleep(0.01)

    def __enter__(self) -> "Ingest":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)


def buffer_hashes(state_dir) -> set[str]:
    conn = sqlite3.connect(f"file:{state_dir / 'buffer.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT sha256 FROM samples").fetchall()
    finally:
        conn.close()
    hashes = [r[0] for r in rows]
    assert len(hashes) == len(set(hashes))
    return set(hashes)


def kill(d) -> list[psutil.Process]:
    """SIGKILL the daemon; returns its worker processes (which must die with it)."""
    try:
        children = psutil.Process(d.proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    d.stop(signal.SIGKILL)
    return children


def check_restart(d, sent: set[str], acked: set[str], children: list[psutil.Process], probe: bytes) -> dict:
    """Restart after a kill and check every invariant; returns the cycles."""
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes outlived the killed daemon: {alive}"
    stored = buffer_hashes(d.state_dir)
    lost = acked - stored
    assert not lost, f"{len(lost)} acknowledged samples lost"
    assert stored <= sent, f"{len(stored - sent)} unknown rows in the buffer"
    d.start()
    cycles = d.client.get("/cycles", params={"limit": 1000}).json()
    for c in cycles:
        assert c["state"] in FINAL, c
        if c["state"] == "failed":
            assert c["reason"], c
    accepted = {"v0001"} | {c["version_after"] for c in cycles if c["state"] == "accepted"}
    active = d.client.get("/status").json()["model"]["version"]
    assert active in accepted, (active, accepted)
    versions = {m["version"] for m in d.client.get("/models").json()}
    assert versions <= accepted, f"versions that were never accepted: {versions - accepted}"
    r = d.infer(probe)
    assert r.status_code == 200 and r.json()["model_version"] == active, r.text
    leftovers = [p for p in d.state_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(LEFTOVER_PREFIXES)]
    assert not leftovers, leftovers
    return {c["id"]: c for c in cycles}


@pytest.mark.parametrize("half", [0, 1])  # two halves, so pytest-xdist can run them side by side
def test_sigkill_during_ingest(make_daemon, half):
    rng = random.Random(SEED + 10 + half)
    d = make_daemon({"EDGETUNE_BUFFER_MAX_ROWS": "100000"}).start()
    # three writers: bulk, unlabelled /infer (queued) and labelled /infer (durable)
    probe = noise_png(rng)
    sent, acked = {sha(probe)}, set()
    kills = INGEST_KILLS // 2 + (INGEST_KILLS % 2 if half else 0)
    for _ in range(kills):
        with Ingest(d.url, rng, threads=3) as load:
            time.sleep(rng.uniform(0.15, 1.2))
            children = kill(d)
        sent |= load.sent
        acked |= load.acked
        check_restart(d, sent, acked, children, probe)
    assert len(acked) > 5 * kills  # the kills really landed in the middle of ingest


def test_labelled_infer_survives_a_kill_and_a_clean_stop_commits_the_queue(make_daemon):
    """The /infer contract: a labelled sample is committed before its answer, so a kill -9 right
    after cannot lose it; an unlabelled one is only queued (a kill may lose it, nothing invents
    it), and a clean stop commits every queued sample."""
    rng = random.Random(SEED + 3)
    d = make_daemon({"EDGETUNE_BUFFER_MAX_ROWS": "100000"}).start()
    labelled = [noise_png(rng) for _ in range(20)]
    unlabelled = [noise_png(rng) for _ in range(60)]
    for k, data in enumerate(labelled):
        body = d.infer(data, label=str(k % 10)).json()
        assert body["buffer"] == "stored" and body["buffered"] and body["sample_id"], body
    for data in unlabelled[:30]:
        body = d.infer(data).json()
        assert body["buffer"] == "queued" and body["sample_id"] is None and not body["buffered"], body
    d.stop(signal.SIGKILL)
    stored = buffer_hashes(d.state_dir)
    assert {sha(b) for b in labelled} <= stored
    assert stored <= {sha(b) for b in labelled + unlabelled[:30]}
    d.start()
    for data in unlabelled[30:]:
        assert d.infer(data).json()["buffer"] == "queued"
    d.stop()  # SIGTERM: the queue is committed on the way out
    assert {sha(b) for b in unlabelled[30:]} <= buffer_hashes(d.state_dir)


def _wait_for_phase(d, cycle_id: str, target: str, rng: random.Random, timeout: float = 120) -> str:
    """Poll the cycle until it is in `target` phase, wait a random moment, return what it was in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = d.client.get(f"/cycles/{cycle_id}").json()
        batch = c["progress"].get("batch") or 0
        if c["state"] in FINAL or (
            (target == "rank" and c["step"] in ("snapshot", "rank") and c["state"] == "running")
            or (target == "train" and batch >= 1)
            or (target == "write" and c["step"] in ("validate", "write", "install"))
        ):
            time.sleep(rng.uniform(0.0, {"rank": 0.6, "train": 1.0, "write": 0.25}[target]))
            c = d.client.get(f"/cycles/{cycle_id}").json()
            return c["state"] if c["state"] in FINAL else f"{c['state']}:{c['step']}"
        time.sleep(0.02)
    raise AssertionError(f"cycle {cycle_id} never reached {target}")


def test_sigkill_during_cycles_and_swaps(make_daemon, device_images):
    rng = random.Random(SEED + 1)
    d = make_daemon(CYCLE_ENV).start()
    payload = [{"image": base64.b64encode(b).decode(), "label": label} for b, label in device_images[:60]]
    assert d.client.post("/samples", json={"samples": payload}).status_code == 201
    sent = {sha(b) for b, _ in device_images[:60]}
    acked = set(sent)
    probe = device_images[0][0]
    seen = collections.Counter()

    for _ in range(CYCLE_KILLS):
        oldest = d.client.get("/models").json()[-1]["version"]  # prune from the biggest model each time
        if d.client.get("/status").json()["model"]["version"] != oldest:
            assert d.client.post(f"/models/{oldest}/activate").status_code == 200
        target = rng.choice(["rank", "train", "write"])
        cycle_id = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
        phase = _wait_for_phase(d, cycle_id, target, rng)
        seen[phase] += 1
        children = kill(d)
        record = check_restart(d, sent, acked, children, probe)[cycle_id]
        if phase in FINAL:
            assert record["state"] == phase, record
        else:  # killed mid-cycle: failed as interrupted, or (killed mid-install) completed on restart
            assert (record["state"] == "failed" and "interrupted" in record["reason"]) or record["state"] == "accepted", record

    # a second version to swap to, then kills while activations load, warm up and flip the pointer
    if len(d.client.get("/models").json()) < 2:
        cycle_id = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
        assert d.wait_cycle(cycle_id, FINAL)["state"] == "accepted"
    for _ in range(SWAP_KILLS):
        versions = [m["version"] for m in d.client.get("/models").json()]
        active = d.client.get("/status").json()["model"]["version"]
        other = next(v for v in versions if v != active)
        threading.Thread(target=lambda: _quiet_post(d.url, f"/models/{other}/activate"), daemon=True).start()
        time.sleep(rng.uniform(0.0, 0.15))
        seen["activate"] += 1
        children = kill(d)
        check_restart(d, sent, acked, children, probe)
    print(f"kills by phase (seed {SEED}): {dict(seen)}")
    assert sum(v for k, v in seen.items() if k.startswith(("running", "paused"))) >= CYCLE_KILLS // 2  # most landed mid-cycle


def _quiet_post(url: str, path: str) -> None:
    try:
        httpx.post(url + path, timeout=30)
    except httpx.HTTPError:
        pass


def _fake_install_record(d, cycle_id: str, version_after: str) -> None:
    """A cycle record as the scheduler writes it just before committing an accepted candidate."""
    folder = d.state_dir / "cycles" / cycle_id
    folder.mkdir(parents=True)
    record = {"id": cycle_id, "state": "running", "created": time.time() - 60, "request": {"level": 0.3}, "step": "install",
              "started": time.time() - 50, "reason": "held-out top-1 0.9 → 0.9", "version_before": "v0001",
              "version_after": version_after}
    (folder / "cycle.json").write_text(json.dumps(record))


def test_restart_completes_a_committed_install_and_drops_an_uncommitted_one(make_daemon, base_model_dir):
    """The two outcomes of a kill during the install, made exactly: the new version's directory
    was committed (the restart completes the install) or not yet (the cycle is failed)."""
    d = make_daemon().start()
    d.stop(signal.SIGKILL)
    shutil.copytree(base_model_dir, d.state_dir / "models" / "v0002")
    _fake_install_record(d, "c-committed", "v0002")
    d.start()
    record = d.client.get("/cycles/c-committed").json()
    assert record["state"] == "accepted" and "completed on restart" in record["reason"], record
    assert d.client.get("/status").json()["model"]["version"] == "v0002"
    assert (d.state_dir / "models" / "active").read_text().strip() == "v0002"

    d.stop(signal.SIGKILL)
    staging = d.state_dir / "models" / ".staging-0123456789ab"
    shutil.copytree(base_model_dir, staging)  # written, never renamed
    _fake_install_record(d, "c-uncommitted", "v0003")
    d.start()
    record = d.client.get("/cycles/c-uncommitted").json()
    assert record["state"] == "failed" and "interrupted" in record["reason"] and "install" in record["reason"], record
    assert record["version_after"] is None
    assert d.client.get("/status").json()["model"]["version"] == "v0002"
    assert not staging.exists() and [m["version"] for m in d.client.get("/models").json()] == ["v0002", "v0001"]
