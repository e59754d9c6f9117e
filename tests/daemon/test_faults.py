"""Faults, for real: a full disk and a read-only state dir (real tmpfs and bind mounts in a
private mount namespace), cycles that raise, run out of memory or overrun their time budget,
exponential backoff of automatic cycles, and corrupted model files at start-up."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import b64, noise_png

from daemon.cycles.backoff import backoff
from daemon.cycles.cycle_records import CycleRecord

pytestmark = pytest.mark.slow  # real daemons, mounts and out-of-memory workers

FINAL = ("accepted", "rejected", "failed", "aborted")


def _mount_unavailable() -> str | None:
    """Why a private mount namespace with a tmpfs cannot be made here (None: it can)."""
    if not shutil.which("unshare"):
        return "no unshare(1)"
    probe = Path("/tmp") / f"edgetune-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"], capture_output=True, text=True, timeout=30)
    finally:
        probe.rmdir()
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace (needs CAP_SYS_ADMIN): {r.stderr.strip()}"


MOUNT_UNAVAILABLE = _mount_unavailable()
needs_mount = pytest.mark.skipif(MOUNT_UNAVAILABLE is not None, reason=str(MOUNT_UNAVAILABLE))


def _seed(d, images, n: int) -> None:
    r = d.client.post("/samples", json={"samples": [{"image": b64(b), "label": label} for b, label in images[:n]]})
    assert r.status_code == 201, r.text


# ---- disk full ---------------------------------------------------------------------------
@needs_mount
def test_disk_full(make_daemon, tmp_path, device_images):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = make_daemon({"EDGETUNE_CYCLE_MIN_STEPS": "0", "EDGETUNE_MIN_SIZE_GAIN": "0", "EDGETUNE_MAX_ACCURACY_DROP": "1"},
                    state_dir=mnt / "state")
    d.wrap = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=12m tmpfs "$0" && exec "$@"', str(mnt)]
    d.start()
    view = Path(f"/proc/{d.proc.pid}/root") / mnt.relative_to("/")  # the daemon's tmpfs, seen from here
    assert os.statvfs(view).f_blocks * os.statvfs(view).f_frsize <= 12 * 2**20  # really the small tmpfs
    _seed(d, device_images, 60)
    acked = {hashlib.sha256(b).hexdigest() for b, _ in device_images[:60]}

    with open(view / "filler", "wb") as fh:  # fill it to the last block
        try:
            while True:
                fh.write(b"\0" * 2**16)
                fh.flush()
        except OSError as exc:
            assert exc.errno == 28
    fresh = [noise_png(i) for i in range(400)]
    statuses = []
    for k in range(0, 400, 20):  # the WAL may still have room for a few rows: write until refused
        batch = fresh[k : k + 20]
        r = d.client.post("/samples", json={"samples": [{"image": b64(b)} for b in batch]})
        statuses.append(r.status_code)
        if r.status_code == 201:
            acked |= {hashlib.sha256(b).hexdigest() for b in batch}
        else:
            break
    assert r.status_code == 507, (statuses, r.text)
    assert "no space left" in r.json()["detail"]

    r = d.infer(fresh[-1], label="4")  # inference keeps working, and a labelled sample says it was not buffered
    assert r.status_code == 200, r.text
    assert r.json()["buffered"] is False and r.json()["buffer"] == "failed" and "no space left" in r.json()["buffer_error"]
    r = d.infer(fresh[-3])  # an unlabelled one is queued behind its answer; its failed commit is counted
    assert r.status_code == 200 and r.json()["buffer"] == "queued", r.text
    deadline = time.monotonic() + 30
    while 'edgetune_samples_dropped_total{reason="storage_error"} 1.0' not in d.client.get("/metrics").text:
        assert time.monotonic() < deadline, "the failed background commit was never counted"
        time.sleep(0.1)
    sid = d.client.get("/status").json()["buffer"]["last_id"]
    assert d.client.post(f"/samples/{sid}/label", json={"label": "4"}).status_code in (200, 507)

    cycle_id = d.client.post("/prune", json={"force": True, "level": 0.3, "epochs": 1}).json()["cycle_id"]
    record = d.wait_cycle(cycle_id, FINAL, timeout=300)
    assert record["state"] == "failed" and "No space left" in record["reason"], record
    assert not list((view / "state" / "models").glob(".staging-*"))
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    assert d.infer(fresh[-2]).status_code == 200

    (view / "filler").unlink()  # space returns: ingest recovers without a restart
    r = d.client.post("/samples", json={"samples": [{"image": b64(b)} for b in fresh[380:390]]})
    assert r.status_code == 201, r.text
    acked |= {hashlib.sha256(b).hexdigest() for b in fresh[380:390]}
    copy = tmp_path / "copy"  # SQLite resolves /proc/<pid>/root to our namespace: read a copy
    copy.mkdir()
    for name in ("buffer.sqlite", "buffer.sqlite-wal"):
        if (view / "state" / name).exists():
            shutil.copyfile(view / "state" / name, copy / name)
    conn = sqlite3.connect(copy / "buffer.sqlite")
    stored = {row[0] for row in conn.execute("SELECT sha256 FROM samples")}
    conn.close()
    assert acked <= stored


# ---- read-only state directory ------------------------------------------------------------
@needs_mount
def test_read_only_state_dir(make_daemon, device_images):
    d = make_daemon().start()
    _seed(d, device_images, 40)
    d.stop()  # a clean stop (the file system then goes read-only, e.g. remounted after errors)
    d.wrap = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(d.state_dir)]
    d.start()
    assert d.client.get("/status").json()["buffer"]["samples"] == 40  # still readable
    r = d.infer(device_images[50][0])
    assert r.status_code == 200 and r.json()["buffered"] is False and "read-only" in r.json()["buffer_error"], r.text
    assert r.json()["buffer"] == "failed"  # known at once: nothing is queued to a read-only buffer
    r = d.client.post("/samples", json={"samples": [{"image": b64(device_images[51][0])}]})
    assert r.status_code == 503 and "read-only" in r.json()["detail"], r.text
    assert d.client.post("/samples/1/label", json={"label": "1"}).status_code == 503
    cycle_id = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
    record = d.wait_cycle(cycle_id, FINAL, timeout=60)
    assert record["state"] == "failed" and "cannot write to the state directory" in record["reason"], record

    d.stop()
    d.wrap = []  # writable again: ingest recovers
    d.start()
    assert d.client.post("/samples", json={"samples": [{"image": b64(device_images[51][0])}]}).status_code == 201


# ---- cycle faults -------------------------------------------------------------------------
def _workers(d) -> list[psutil.Process]:
    """The daemon's cycle worker processes (not multiprocessing's resource tracker)."""
    return [p for p in psutil.Process(d.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]


def test_failing_and_overrunning_cycles_are_recorded_and_serving_goes_on(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_CYCLE_TIMEOUT_S": "20", "EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()
    # a cycle that raises: nothing to train on
    cycle_id = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
    record = d.wait_cycle(cycle_id, FINAL, timeout=120)
    assert record["state"] == "failed" and "snapshot has 0 training" in record["reason"], record
    assert d.infer(device_images[0][0]).status_code == 200

    # a cycle that exceeds its time budget is killed
    _seed(d, device_images, 90)
    cycle_id = d.client.post("/prune", json={"force": True, "epochs": 500}).json()["cycle_id"]
    while d.client.get(f"/cycles/{cycle_id}").json()["state"] not in ("running", *FINAL):
        time.sleep(0.1)
    workers = _workers(d)
    assert workers, "no worker process"
    record = d.wait_cycle(cycle_id, FINAL, timeout=120)
    assert record["state"] == "failed" and "cycle_timeout_s" in record["reason"], record
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    assert d.infer(device_images[1][0]).status_code == 200
    assert d.client.get("/status").json()["model"]["version"] == "v0001"
    assert 'edgetune_cycles_total{outcome="failed"} 2.0' in d.client.get("/metrics").text


def test_out_of_memory_cycles_back_off_exponentially(make_daemon, device_images):
    base = 2.0
    d = make_daemon({"EDGETUNE_CYCLE_MEMORY_LIMIT_MB": "512", "EDGETUNE_AUTO_CYCLES": "true", "EDGETUNE_NEW_SAMPLES_PER_CYCLE": "5",
                     "EDGETUNE_MIN_SAMPLES": "5", "EDGETUNE_CYCLE_BACKOFF_BASE_S": str(base), "EDGETUNE_CYCLE_BACKOFF_MAX_S": "8"}).start()
    fed = 0
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # keep new samples coming, so only the backoff holds cycles back
        cycles = d.client.get("/cycles").json()
        if len([c for c in cycles if c["state"] == "failed"]) >= 4:
            break
        batch = [{"image": b64(noise_png(10_000 + fed + k))} for k in range(5)]
        assert d.client.post("/samples", json={"samples": batch}).status_code == 201
        fed += 5
        time.sleep(1.0)
    cycles = sorted(d.client.get("/cycles").json(), key=lambda c: c["created"])
    failed = [c for c in cycles if c["state"] == "failed"]
    assert len(failed) >= 4, cycles
    for c in failed:
        assert c["trigger"] == "periodic" and c["reason"].startswith("out of memory (cycle_memory_limit_mb=512)"), c
    # each started only once the backoff after the failures before it had run out (2, 4, then 8 s)
    records = [CycleRecord(**c) for c in cycles]
    for i, c in enumerate(records[1:], 1):
        wait = backoff(records[:i], now=c.created, base_s=base, max_s=8)
        assert wait.failures == i and not wait.holds(c.created), (i, wait, c)
    scheduler = d.client.get("/status").json()["scheduler"]
    assert scheduler["consecutive_failures"] >= 4
    assert d.infer(device_images[0][0]).status_code == 200
    # a person may still start one by hand during the backoff
    assert d.client.post("/prune", json={"force": True}).status_code in (202, 409)


# ---- corrupted models and config at start-up -----------------------------------------------
def test_corrupted_active_model_falls_back_to_last_good(make_daemon, base_model_dir):
    d = make_daemon().start()
    v2 = d.state_dir / "models" / "v0002"
    for damage in ("model_json_garbage", "model_json_missing", "weights_flipped", "weights_truncated"):
        d.stop(signal.SIGKILL)
        shutil.rmtree(v2, ignore_errors=True)
        shutil.copytree(base_model_dir, v2)
        (d.state_dir / "models" / "active").write_text("v0002\n")
        if damage == "model_json_garbage":
            (v2 / "model.json").write_text("{not json")
        elif damage == "model_json_missing":
            (v2 / "model.json").unlink()
        else:
            weights = v2 / "weights.safetensors"
            data = bytearray(weights.read_bytes())
            if damage == "weights_flipped":
                data[len(data) // 2] ^= 0xFF
            else:
                data = data[: len(data) // 3]
            weights.write_bytes(bytes(data))
        log_start = d.log.stat().st_size
        d.start()
        assert d.client.get("/status").json()["model"]["version"] == "v0001", damage
        assert d.infer(b"").status_code == 400  # a working API
        assert (d.state_dir / "models" / "active").read_text().strip() == "v0001", damage
        log = d.log.read_bytes()[log_start:].decode(errors="replace")
        if damage != "model_json_missing":  # a version without model.json is not a version at all
            assert "model v0002 does not load" in log and "falling back to model v0001" in log, damage


def test_no_loadable_model_and_malformed_config_stop_startup_with_one_line(make_daemon, tmp_path):
    exe = shutil.which("edgetune", path=os.path.dirname(sys.executable))
    d = make_daemon().start()
    d.stop()
    (d.state_dir / "models" / "v0001" / "weights.safetensors").write_bytes(b"\x00" * 64)
    r = subprocess.run([exe, "serve", "--state-dir", str(d.state_dir)], env=d.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no loadable model version" in r.stderr.splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr

    (d.state_dir / "config.toml").write_text("port = [unclosed\n")
    r = subprocess.run([exe, "serve", "--state-dir", str(d.state_dir)], env=d.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid configuration" in r.stderr and "config.toml" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (d.state_dir / "config.toml").write_text("cycle_memory_limit_mb = 1\n")
    r = subprocess.run([exe, "serve", "--state-dir", str(d.state_dir)], env=d.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cycle_memory_limit_mb" in r.stderr, r.stderr
    json.dumps(r.stderr)  # printable
