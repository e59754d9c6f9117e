"""bench/retrain_scope.py end to end on a few real CIFAR-10 images (a base model trained, each scope
retrained in a measured child, a rerun resumes), and its --memory-only mode on random images."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "retrain_scope.py"
DATA = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_scopes_measured_side_by_side_and_resumed(tmp_path):
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    args = ["--network", "cifar_small", "--per-class", "30", "--test-per-class", "30", "--base-epochs", "1", "--epochs", "1",
            "--subset-sizes", "2", "--subsets-per-size", "1", "--scopes", "full,last", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["full", "last"]
    assert all(float(r["peak_mb"]) > 0 and float(r["cpu_seconds"]) > 0 for r in rows)
    assert float(rows[0]["trainable_share"]) == 1.0 > float(rows[1]["trainable_share"])
    assert rows[1]["front"].startswith("front up to 'layer") and "no frozen front" in rows[0]["front"]
    assert all(0 <= float(r["file_mb"]) <= float(r["peak_mb"]) for r in rows)
    assert "| last |" in proc.stdout
    again = run(*args)  # everything done: nothing retrained, the same table
    assert again.returncode == 0 and "top-1" not in again.stderr.replace("held-out top1", "")
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # a saved base model, scored on images past the first 20 of each class; the front run whole
    base = tmp_path / "out" / "models" / "cifar_small-32"
    proc = run(*args[:-1], str(tmp_path / "out2"), "--base", str(base), "--test-from", "20", "--scopes", "last:0.25:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on the 100 scored images" in proc.stderr  # 10 of each class
    with open(tmp_path / "out2" / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["variant"] == "last:0.25:1" and "one micro-batch" in row["front"]


@pytest.mark.slow
def test_memory_only_needs_no_data():
    proc = run("--memory-only", "--network", "cifar_small", "--batch-size", "8", "--steps", "1", "--scopes", "full,bias")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| full | 100 % |" in proc.stdout and "| bias |" in proc.stdout
