"""The sample buffer on a real SQLite file: group commit, dedupe, balance-keeping eviction,
a stable held-out split, and durability across kill -9."""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from daemon.storage.buffer import SCHEMA_VERSION, NewSample, SampleBuffer, is_holdout, read_snapshot


def _img(i: int) -> bytes:
    return f"image-{i}".encode() * 10


def test_schema_and_pragmas(tmp_path):
    buf = SampleBuffer(tmp_path / "b.sqlite", 1000, 2**30, 0.2)
    conn = sqlite3.connect(tmp_path / "b.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert buf._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    buf.close()
    SampleBuffer(tmp_path / "b.sqlite", 1000, 2**30, 0.2).close()  # reopening migrates nothing twice


def test_group_commit_from_many_threads(tmp_path):
    buf = SampleBuffer(tmp_path / "b.sqlite", 10_000, 2**30, 0.2)
    buf.start()
    futures = []

    def work(base):
        for i in range(50):
            futures.append(buf.submit(NewSample(_img(base + i), "image/png", pred=i % 3)))

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [f.result(timeout=10).id for f in futures]
    assert len(set(ids)) == 200
    assert buf.stats()["samples"] == 200
    dup = buf.submit(NewSample(_img(0), "image/png", label=2)).result(timeout=10)
    assert dup.duplicate and buf.stats()["samples"] == 200 and buf.stats()["labelled"] == 1
    buf.close()


def test_eviction_keeps_classes_balanced_and_recent(tmp_path):
    buf = SampleBuffer(tmp_path / "b.sqlite", 20, 2**30, 0.2)
    buf.add_many([NewSample(_img(i), "image/png", pred=0) for i in range(30)])
    buf.add_many([NewSample(_img(100 + i), "image/png", label=1, pred=0) for i in range(5)])
    stats = buf.stats()
    assert stats["samples"] == 20 and stats["per_class"] == {0: 15, 1: 5}
    kept = [r[0] for r in read_snapshot(buf.path, 10**9)]
    assert min(kept) > 15  # the oldest of the big class went first
    assert buf.evicted == 15
    buf.close()


def test_eviction_by_bytes(tmp_path):
    buf = SampleBuffer(tmp_path / "b.sqlite", 10_000, 70_000, 0.2)
    buf.add_many([NewSample(os.urandom(1000), "image/png", pred=i % 2) for i in range(100)])
    stats = buf.stats()
    assert stats["bytes"] <= 70_000 and stats["samples"] >= 60
    assert abs(stats["per_class"][0] - stats["per_class"][1]) <= 8
    buf.close()


def test_holdout_is_deterministic_by_content(tmp_path):
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
    flags = [is_holdout(d, 0.2) for d in digests]
    assert flags == [is_holdout(d, 0.2) for d in digests]
    assert 0.15 < sum(flags) / len(flags) < 0.25
    buf = SampleBuffer(tmp_path / "b.sqlite", 10_000, 2**30, 0.2)
    buf.add_many([NewSample(_img(i), "image/png") for i in range(500)])
    held = sum(r[4] for r in read_snapshot(buf.path, 10**9))
    assert 60 < held < 140
    buf.close()


WRITER = textwrap.dedent(
    """
    import sys
    from daemon.storage.buffer import NewSample, SampleBuffer
    buf = SampleBuffer(sys.argv[1], 10**6, 2**40, 0.2)
    buf.start()
    i = 0
    while True:
        futures = [buf.submit(NewSample(f"img-{i + k}".encode() * 20, "image/png", pred=k % 5)) for k in range(8)]
        for f in futures:
            print(f.result().id, flush=True)
        i += 8
    """
)


@pytest.mark.slow
def test_committed_rows_survive_kill_9(tmp_path):
    path = tmp_path / "b.sqlite"
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        acknowledged = []
        deadline = time.monotonic() + 0.8 + 0.3 * round_
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                acknowledged.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert acknowledged, "the writer acknowledged nothing"
        present = {r[0] for r in read_snapshot(path, 10**12)}
        missing = set(acknowledged) - present
        assert not missing, f"round {round_}: {len(missing)} acknowledged rows lost"
