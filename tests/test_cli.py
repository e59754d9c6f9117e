"""The `edgetune` command line. The slow tier runs the installed console script as real subprocesses:
init → train → prune → eval → info → export on MNIST digits, `--level auto`, and a one-line error
from the console script itself. The one-line errors of every user mistake are checked in-process
(prune_core.cli.run, the function the console script exits with), in milliseconds.

Independent subprocess commands (the `--level auto` run, and the read-only commands on the pruned
model) run concurrently in a small thread pool to keep the module's wall time down.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prune_core import cli
from prune_core.architectures import build_model
from prune_core.cli import HOLDOUT
from prune_core.data import holdout_mask
from prune_core.level_search import DEFAULT_GRID
from prune_core.model_format import MODEL_JSON, ModelCard, save_model

DIGITS = [str(d) for d in range(10)]


def ok(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a successful command prints."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout, parse_constant=strict_json)


def strict_json(name: str):
    raise AssertionError(f"{name} in the output: not JSON (other parsers reject it)")


def one_line_error(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """A user error: exit status 2, nothing on stdout, exactly one line on stderr."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith(f"edgetune {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def copy_classes(src: Path, dst: Path, classes: list[str]) -> Path:
    for cls in classes:
        shutil.copytree(src / cls, dst / cls)
    return dst


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    """One background worker for the independent side runs (the main flow runs alongside it)."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


@pytest.fixture(scope="module")
def work(tmp_path_factory, mnist_folder) -> dict[str, Path]:
    """Folders and an untrained 10-digit model directory (written in-process) for the side runs."""
    root = tmp_path_factory.mktemp("cli")
    subset = copy_classes(mnist_folder, root / "digits012", ["0", "1", "2"])
    unknown = copy_classes(mnist_folder, root / "with_unknown", ["3", "4"])
    (unknown / "cat").mkdir()
    shutil.copy(next((mnist_folder / "5").iterdir()), unknown / "cat" / "meow.png")
    torch.manual_seed(0)
    model_dir = root / "untrained"
    save_model(build_model("cifar_small", 10), ModelCard("cifar_small", 10, list(DIGITS), 32), model_dir)
    broken = root / "broken_json"
    shutil.copytree(model_dir, broken)
    (broken / MODEL_JSON).write_text('{"format": "edgetune-model", "arch": ')
    (root / "garbage.pt").write_bytes(b"this is not a torch file")
    weights = (model_dir / "weights.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(weights[:20])
    tiny = root / "tiny"  # four images, none of them in the held-out split
    names = [f"{i}.png" for i in range(40)]
    for cls in ("0", "1"):
        (tiny / cls).mkdir(parents=True)
        kept = [n for n, held in zip(names, holdout_mask([f"{cls}/{n}" for n in names], HOLDOUT).tolist()) if not held][:2]
        for name, src in zip(kept, sorted((mnist_folder / cls).iterdir())):
            shutil.copy(src, tiny / cls / name)
    shutil.copytree(model_dir, root / "tiny_model")  # trained on `tiny`; the side runs' model stays untrained
    return {"root": root, "subset": subset, "unknown": unknown, "model": model_dir, "broken": broken, "tiny": tiny}


ERROR_CASES = {
    # name: (argv builder, command, fragments expected in the message)
    "missing_data_folder": (lambda w: ["train", w["model"], "--data", w["root"] / "nope", "--epochs", "1"], "train", ["does not exist"]),
    "unknown_class": (lambda w: ["eval", w["model"], "--data", w["unknown"]], "eval", ["cat", "--skip-unknown"]),
    "unknown_arch": (lambda w: ["init", w["root"] / "new", "--arch", "resnet9000", "--num-classes", "3"], "init", ["unknown architecture 'resnet9000'"]),
    "level_too_big": (lambda w: ["prune", w["model"], "--data", w["subset"], "--level", "1.5", "--out", w["root"] / "o1"], "prune", ["--level", "1.5"]),
    "level_not_a_number": (lambda w: ["prune", w["model"], "--data", w["subset"], "--level", "abc", "--out", w["root"] / "o2"], "prune", ["--level", "abc"]),
    # the same rule as the daemon's config, API and demo (prune_core.options.parse_level): 0 prunes nothing
    "level_zero": (lambda w: ["prune", w["model"], "--data", w["subset"], "--level", "0", "--out", w["root"] / "o0"], "prune",
                   ["--level", "between 0 and 1", "'0'"]),
    "unknown_criterion_in_a_list": (lambda w: ["prune", w["model"], "--data", w["subset"], "--level", "0.5", "--criterion", "taylor,magic",
                                               "--out", w["root"] / "o3"], "prune", ["--criterion", "unknown criterion 'magic'"]),
    "unknown_allocation": (lambda w: ["prune", w["model"], "--data", w["subset"], "--level", "0.5", "--allocation", "uniform,even",
                                      "--out", w["root"] / "o4"], "prune", ["--allocation", "unknown allocation 'even'"]),
    "last_share_zero": (lambda w: ["prune", w["model"], "--data", w["subset"], "--level", "0.5", "--retrain-scope", "last",
                                   "--last-share", "0", "--out", w["root"] / "o5"], "prune", ["--last-share", "(0, 1]"]),
    "missing_model_dir": (lambda w: ["eval", w["root"] / "no_model", "--data", w["subset"]], "eval", ["no_model", "not found"]),
    "corrupted_model_json": (lambda w: ["info", w["broken"]], "info", ["model.json", "not valid JSON"]),
    # initial weights that cannot be read are a user error too, not a traceback
    "garbage_torch_weights": (lambda w: ["init", w["root"] / "i1", "--arch", "cifar_small", "--num-classes", "10",
                                         "--weights", w["root"] / "garbage.pt"], "init", ["garbage.pt"]),
    "truncated_safetensors_weights": (lambda w: ["init", w["root"] / "i2", "--arch", "cifar_small", "--num-classes", "10",
                                                 "--weights", w["root"] / "truncated.safetensors"], "init", ["truncated.safetensors"]),
}


@pytest.fixture(scope="module")
def side_runs(pool, work, edgetune) -> dict[str, Future]:
    """Start the `--level auto` run, `--skip-unknown`, a tiny training run and an error in the background."""
    run_edgetune = edgetune
    build, _, _ = ERROR_CASES["unknown_arch"]
    futures = {"error": pool.submit(run_edgetune, *build(work))}
    futures["skip_unknown"] = pool.submit(run_edgetune, "eval", work["model"], "--data", work["unknown"], "--skip-unknown")
    futures["tiny"] = pool.submit(run_edgetune, "train", work["root"] / "tiny_model", "--data", work["tiny"], "--epochs", "1", "--quiet")
    futures["auto"] = pool.submit(
        run_edgetune, "prune", work["model"], "--data", work["subset"], "--level", "auto", "--epochs", "1",
        "--no-flip", "--out", work["root"] / "auto_out",
    )
    return futures


@pytest.fixture(scope="module")
def flow(tmp_path_factory, mnist_folder, work, edgetune, side_runs) -> dict:
    """init → train → prune (activation, 0.5) in sequence, then eval/info/export/subset eval together
    (the background runs, started first, overlap it)."""
    run_edgetune = edgetune
    root = tmp_path_factory.mktemp("flow")
    base, pruned, onnx_path = root / "base", root / "pruned", root / "x.onnx"
    out = {"base": base, "pruned": pruned, "onnx": onnx_path}
    out["init"] = ok(run_edgetune("init", base, "--arch", "cifar_small", "--classes-from", mnist_folder))
    out["train"] = ok(run_edgetune("train", base, "--data", mnist_folder, "--epochs", "1", "--no-flip", "--quiet"))
    out["prune"] = ok(run_edgetune(
        "prune", base, "--data", mnist_folder, "--level", "0.5", "--criterion", "activation", "--allocation", "global", "--epochs", "1",
        "--fade", "1", "--retrain-scope", "last_bn", "--last-share", "0.6", "--no-flip", "--quiet", "--out", pruned,
    ))
    with ThreadPoolExecutor(max_workers=2) as pool:  # read-only commands on the pruned model
        later = {
            "eval": pool.submit(run_edgetune, "eval", pruned, "--data", mnist_folder),
            "eval_subset": pool.submit(run_edgetune, "eval", pruned, "--data", work["subset"]),
            "info": pool.submit(run_edgetune, "info", pruned),
            "export": pool.submit(run_edgetune, "export", pruned, "--onnx", onnx_path),
        }
        out.update({name: ok(f.result()) for name, f in later.items()})
    return out


# ---------------------------------------------------------------------------
# The main flow
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_init(flow, mnist_folder):
    init = flow["init"]
    assert init["arch"] == "cifar_small" and init["num_classes"] == 10 and init["input_size"] == 32
    assert init["params"] > 600_000 and init["macs"] > 0
    card = json.loads((flow["base"] / MODEL_JSON).read_text())
    assert card["class_names"] == DIGITS  # sorted sub-folder names of --classes-from


@pytest.mark.slow
def test_train(flow):
    train = flow["train"]
    assert train["epochs_run"] == 1 and len(train["history"]) == 1 and train["early_stop_epoch"] is None
    assert train["calibration"]["temperature"] > 0 and abs(sum(train["calibration"]["class_prior"].values()) - 1) < 1e-6
    assert train["train_samples"] + train["held_out_samples"] == 400
    assert 40 <= train["held_out_samples"] <= 120
    assert 0.0 <= train["held_out_top1"] <= 1.0 and train["seconds"] > 0


@pytest.mark.slow
def test_prune_summary(flow):
    s = flow["prune"]
    assert s["criterion"] == "activation" and s["level"] == 0.5 and s["level_requested"] == 0.5 and s["fade_epochs"] == 1
    assert s["retrain_scope"] == s["retrain_plan"]["scope"] == "last_bn" and 0 < s["retrain_plan"]["trainable_share"] < 1
    assert s["retrain_plan"]["last_share"] == 0.6
    assert s["allocation"] == s["allocation_used"] == s["probes"][0]["allocation"] == "global"
    for key in ("params_before", "params_after", "macs_before", "macs_after", "top1_before", "top1_after", "seconds", "peak_rss_mb"):
        assert key in s, key
    assert s["params_before"] == flow["init"]["params"]
    assert abs(s["params_after"] / s["params_before"] - 0.5) < 0.05
    assert s["macs_after"] < s["macs_before"]
    assert 0.0 <= s["top1_before"] <= 1.0 and 0.0 <= s["top1_after"] <= 1.0
    assert s["seconds"] > 0 and s["peak_rss_mb"] > 50
    assert len(s["probes"]) == 1 and s["probes"][0]["level"] == 0.5
    assert s["out"] == str(flow["pruned"])
    assert sum(c["total"] for c in s["held_out_per_class"].values()) == s["held_out_samples"]


@pytest.mark.slow
def test_eval(flow):
    e = flow["eval"]
    assert e["samples"] == 400 and e["total"] == 400
    assert 0.0 <= e["top1"] <= 1.0 and e["correct"] == round(e["top1"] * 400)
    assert set(e["per_class"]) == set(DIGITS)
    for name, c in e["per_class"].items():
        assert c["total"] == 40, name
        assert 0 <= c["correct"] <= 40 and c["top1"] == pytest.approx(c["correct"] / 40)
    assert sum(c["correct"] for c in e["per_class"].values()) == e["correct"]


@pytest.mark.slow
def test_eval_on_a_folder_with_some_classes(flow):
    e = flow["eval_subset"]
    assert e["samples"] == e["total"] == 120
    assert set(e["per_class"]) == {"0", "1", "2"}
    assert all(c["total"] == 40 for c in e["per_class"].values())
    # per-class results agree with the full evaluation (up to a near-tie flipped by batch size)
    for cls in ("0", "1", "2"):
        assert abs(e["per_class"][cls]["correct"] - flow["eval"]["per_class"][cls]["correct"]) <= 1


@pytest.mark.slow
def test_info(flow):
    info = flow["info"]
    assert info["arch"] == "cifar_small" and info["class_names"] == DIGITS and info["input_size"] == 32
    assert info["params"] == flow["prune"]["params_after"]
    assert info["macs"] == flow["prune"]["macs_after"]
    lineage = info["lineage"]
    assert lineage["criterion"] == "activation" and lineage["level"] == 0.5 and lineage["allocation"] == "global"
    assert lineage["parent"] == str(flow["base"].resolve())
    assert lineage["metrics"]["params_after"] == info["params"]
    assert info["layers"]["fc"] == 10
    assert info["layers"]["layer3.0"] < 256 and info["size_mb"] > 0


@pytest.mark.slow
def test_export(flow):
    ex = flow["export"]
    assert flow["onnx"].is_file() and ex["onnx"] == str(flow["onnx"]) and ex["opset"] == 17
    assert 0 <= ex["max_abs_diff_vs_torch"] <= 1e-4


# ---------------------------------------------------------------------------
# --level auto and --skip-unknown (background runs)
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_level_auto_prints_probes(side_runs):
    proc = side_runs["auto"].result()
    s = ok(proc)
    probes = s["probes"]
    assert 1 <= len(probes) <= 5
    assert s["level_requested"] == "auto" and s["top1_ceiling"] is not None
    for p in probes:
        assert p["level"] in DEFAULT_GRID
        assert set(p) >= {"level", "achieved_level", "accuracy", "params", "macs", "seconds", "feasible", "retrain_epochs", "kept_epoch"}
        assert p["retrain_epochs"] >= 1 and 0 <= p["kept_epoch"] <= p["retrain_epochs"]
        assert p["feasible"] == (p["accuracy"] >= s["top1_ceiling"] - 0.02)
    feasible = [p["level"] for p in probes if p["feasible"]]
    assert s["level"] == (max(feasible) if feasible else 0.0)
    if s["level"] > 0:
        assert s["params_after"] < s["params_before"]
    else:
        assert s["params_after"] == s["params_before"]
    assert set(s["held_out_per_class"]) <= {"0", "1", "2"}
    # without --quiet, each probe is also reported on stderr as it finishes
    assert proc.stderr.count("probe level=") == len(probes)
    for p in probes:
        assert f"retrained={p['retrain_epochs']} kept={p['kept_epoch']}" in proc.stderr
    assert Path(s["out"], MODEL_JSON).is_file()


@pytest.mark.slow
def test_train_without_held_out_samples_prints_strict_json(side_runs):
    """Four images, none held out: no held-out score exists, and the JSON says null (not NaN, which
    only Python's parser accepts; ok() rejects it)."""
    train = ok(side_runs["tiny"].result())
    assert train["held_out_samples"] == 0 and train["train_samples"] == 4
    assert train["held_out_top1"] is None and train["history"][0]["val_score"] is None and train["history"][0]["val_loss"] is None


@pytest.mark.slow
def test_skip_unknown_makes_eval_work(side_runs):
    e = ok(side_runs["skip_unknown"].result())
    assert e["samples"] == 80 and set(e["per_class"]) == {"3", "4"}


# ---------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, no traceback
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_console_script_error_is_one_line(side_runs):
    """The installed script itself: exit status 2 and the one line, as `run` gives them in-process."""
    _, command, fragments = ERROR_CASES["unknown_arch"]
    one_line_error(side_runs["error"].result(), command, *fragments)


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_error(work, name, capsys):
    build, command, fragments = ERROR_CASES[name]
    try:
        status = cli.run([str(a) for a in build(work)])
    except SystemExit as stop:  # argparse's usage errors exit from inside the parser
        status = stop.code
    out, err = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess(build(work), status, out, err), command, *fragments)
