"""bench/paper_protocol.py --quick end to end on the real CIFAR-10 images, and the parts of bench/protocol/ it runs."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "paper_protocol.py"
DATA = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
METHODS = {"agnostic", "adapt", "activation", "apoz", "taylor", "none", "ceiling"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    """paper_protocol and the protocol package importable as the script itself sees them (bench/ first)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))


# --quick, made smaller still for CI: the test checks the protocol's mechanics, not its numbers.
# The base model and the agnostic baseline train on a larger cap than the subsets (--base-per-class).
SMALLER = ["--per-class", "120", "--base-per-class", "160", "--base-epochs", "2"]


@pytest.mark.slow
def test_quick_protocol_end_to_end(tmp_path):
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    out = tmp_path / "out"
    # a lease-sized run: --max-minutes stops starting rows, still writes the report, and the next run resumes
    partial = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *SMALLER, "--out", str(out), "--cache", str(tmp_path / "cache"), "--max-minutes", "0.001"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert partial.returncode == 0, partial.stderr[-4000:]
    assert "--max-minutes reached after 1 of" in partial.stderr and (out / "results.md").is_file()

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *SMALLER, "--out", str(out), "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == METHODS
    cells = {(r["network"], r["level"], r["subset"]) for r in rows}
    assert {r["level"] for r in rows} == {"0.50", "0.90"}
    assert len({r["subset"] for r in rows}) == 2
    for cell in cells:  # every (network, level, subset) has every method exactly once
        methods = [r["method"] for r in rows if (r["network"], r["level"], r["subset"]) == cell]
        assert sorted(methods) == sorted(METHODS), cell
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        if r["method"] != "none":  # every trained row records the validation score its pick (or PICKED) uses
            assert 0.0 <= float(r["val_accuracy"]) <= 1.0, r
        assert int(r["params"]) > 0 and int(r["macs"]) > 0 and float(r["seconds"]) >= 0
    base = {r["params"] for r in rows if r["method"] in ("none", "ceiling")}
    assert len(base) == 1
    for agnostic in (r for r in rows if r["method"] == "agnostic"):  # on 160 images per class, the subsets on 120
        ceiling = next(r for r in rows if r["method"] == "ceiling" and r["subset"] == agnostic["subset"])
        assert int(agnostic["train_samples"]) / 10 > 1.2 * int(ceiling["train_samples"]) / int(ceiling["subset_size"])
    assert all(int(r["params"]) < int(next(iter(base))) for r in rows if r["method"] not in ("none", "ceiling"))

    md = (out / "results.md").read_text()
    assert "| taylor | picked | best |" in md
    assert "| cifar_small | 0.50 |" in md and "| cifar_small | 0.90 |" in md
    assert "| cifar_small | 0.50 |" in proc.stdout  # the table is printed too
    png = out / "accuracy_vs_level.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(png) as img:
        img.verify()

    # a rerun resumes from the CSV: nothing is recomputed and the results are unchanged
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *SMALLER, "--out", str(out), "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already in results.csv" in again.stderr
    with open(out / "results.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows

    # results of another recipe are never mixed in: changing a setting needs another --out
    other = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *SMALLER, "--allocation", "global", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert other.returncode != 0 and "differs in: allocation" in other.stderr
    resized = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *SMALLER, "--image-size", "24", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert resized.returncode != 0 and "differs in: image_size" in resized.stderr


def _row(subset: str, method: str, accuracy: float, val: float | str = "") -> dict:
    return dict(network="n", level="0.90", subset=subset, subset_size="2", method=method, accuracy=str(accuracy), val_accuracy=str(val))


def test_picked_is_the_data_aware_run_best_on_validation_not_on_test():
    from protocol.report import summarise
    from protocol.results import DATA_AWARE, PICKED

    rows = [_row(s, m, 0.5) for s in ("a", "b") for m in ("none", "ceiling", "agnostic")]
    # subset a: taylor has the best validation score but not the best test score
    rows += [_row("a", "adapt", 0.80, 0.70), _row("a", "activation", 0.90, 0.60), _row("a", "apoz", 0.70, 0.65), _row("a", "taylor", 0.75, 0.71)]
    # subset b: a tie on validation goes to the first data-aware method
    rows += [_row("b", m, acc, 0.6) for m, acc in zip(DATA_AWARE, (0.60, 0.65, 0.70, 0.75))]
    cell = summarise(rows)["table"][("n", 0.9)]
    assert cell[PICKED] == {"a": 0.75, "b": 0.60}
    # without validation scores for every data-aware run (results of older runs) there is no pick
    cell = summarise([r for r in rows if not (r["subset"] == "b" and r["method"] == "apoz")] + [_row("b", "apoz", 0.7)])["table"][("n", 0.9)]
    assert set(cell[PICKED]) == {"a"}


def test_larger_caps_add_held_out_images_never_trained_on(tmp_path):
    """--test-per-class scores on a superset of the held-out images; --base-per-class trains the base model on a
    superset of the subsets' training images; neither ever trains on a held-out image."""
    from PIL import Image
    from protocol.data import CLASSES, load_splits

    for c in CLASSES:
        (tmp_path / c).mkdir()
        for i in range(40):
            Image.new("RGB", (8, 8), (i * 6, 0, 0)).save(tmp_path / c / f"{i:04d}.jpg")
    small = load_splits(tmp_path, 8, 10, 0.1)
    wide = load_splits(tmp_path, 8, 10, 0.1, test_per_class=40)
    assert (wide.fit.keys, wide.val.keys) == (small.fit.keys, small.val.keys)
    assert set(small.test.keys) < set(wide.test.keys)
    assert not set(wide.test.keys) & set(small.fit.keys + small.val.keys)
    assert len(wide.test) > 2 * len(small.test)
    whole = load_splits(tmp_path, 8, 40, 0.1)
    assert set(small.fit.keys) < set(whole.fit.keys) and set(small.val.keys) <= set(whole.val.keys)
    assert not set(whole.fit.keys + whole.val.keys) & set(wide.test.keys)


def test_image_size_overrides_each_networks_own_and_is_checked_against_its_minimum(capsys):
    import paper_protocol as pp

    assert pp.parse_args(["--quick", "--networks", "resnet18", "--image-size", "32"]).image_size == 32
    assert pp.parse_args(["--quick", "--networks", "resnet18"]).image_size is None  # resnet18's own 64
    with pytest.raises(SystemExit):
        pp.parse_args(["--quick", "--networks", "squeezenet1_1", "--image-size", "16"])
    assert "squeezenet1_1: image size 16 is below its minimum 17" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not silently "the default"
        pp.parse_args(["--quick", "--image-size", "0"])
    assert "cifar_small: image size 0 is below its minimum 1" in capsys.readouterr().err
