"""bench/retrain_ablation.py end to end on a few real CIFAR-10 images (variants parsed, ceiling and
variants computed on the same subset, a rerun resumes), and bad variants refused in one line."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prune_core import ModelCard, build_model, save_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "retrain_ablation.py"
DATA = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_variants_side_by_side_and_resume(tmp_path):
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    torch.manual_seed(0)
    base = tmp_path / "base"
    save_model(build_model("cifar_small", 10), ModelCard("cifar_small", 10, CLASSES, 32), base)
    common = ["--base", str(base), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
              "--per-class", "30", "--test-per-class", "60", "--subset-sizes", "2", "--subsets-per-size", "1", "--levels", "0.5",
              "--epochs", "2", "--threads", "1", "--variants", "l1", "l1:alloc=global,nf=0,kd=0,lr=0.05,mlr=0.5"]
    proc = run(*common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["l1", "l1:alloc=global,nf=0,kd=0,lr=0.05,mlr=0.5"]
    assert len({r["ceiling"] for r in rows}) == 1  # one ceiling per subset, shared by the variants
    assert all(abs(float(r["level_achieved"]) - 0.5) < 0.03 for r in rows)
    assert "| 0.50 | l1 |" in proc.stdout and "to ceiling (2 cl.)" in proc.stdout

    again = run(*common)
    assert again.returncode == 0 and "ceiling" not in again.stderr  # nothing recomputed
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows


@pytest.mark.parametrize("variant", ["l1:depth=3", "l1:nf=2", "l1:alloc"])
def test_bad_variant_is_one_line(monkeypatch, variant):
    """In-process: the script exits with a one-line message (SystemExit with a string: Python prints it on
    stderr and exits 1), before any data or model is touched."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import retrain_ablation

    with pytest.raises(SystemExit) as stop:
        retrain_ablation.parse_args(["--variants", variant, "--epochs", "2"])
    message = str(stop.value.code)
    assert message.startswith("retrain_ablation: ") and "\n" not in message, message
