"""Every built-in architecture, a CIFAR network and a timm network through the `edgetune` command
line as a user runs it: init → prune (level 0.5, activation ranking, one epoch of retraining) →
info → export (ONNX, verified under onnxruntime). In-process (the console script's own parser and
`run`), on eight tiny images at the smallest input each network takes, so one network costs
seconds; the networks that take longer are the slow tier. mnasnet1_0 once failed here alone (its
module version was lost when retraining restored the best epoch); alexnet and vgg11_bn did not
export (an adaptive pool the exporter refused).

This is also the test that every architecture prunes to its level and its pruned structure is
rebuilt from the model directory (`info` and `export` load it): tests/test_architectures.py keeps
the library-level checks that need the pruned model in memory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from daemon.cli import build_parser
from prune_core.arch_names import BUILTIN_SIZES
from prune_core.cli import run

TIMM = "timm:mobilenetv3_small_050"
CLASSES = ("cat", "dog")
IMAGES_PER_CLASS = 4
SMALLEST = 32
# Over ~20 s on a busy 2-core CPU (--durations), mostly the level search's prunes of a large graph.
SLOW = {"alexnet", "convnext_tiny", "densenet121", "regnet_y_400mf", "resnet50", "resnext50_32x4d", "shufflenet_v2_x1_0", "vgg11_bn",
        "wide_resnet50_2", TIMM}


def arch_params() -> list:
    archs = sorted(BUILTIN_SIZES) + [TIMM]
    return [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in archs]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """ImageFolder: two classes of four random 32×32 RGB PNGs."""
    root = tmp_path_factory.mktemp("tiny") / "images"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def edgetune(parser, capsys, *argv) -> dict:
    """One `edgetune` command in this process, as the console script runs it: its JSON output."""
    code = run([str(a) for a in argv], parser)
    out, err = capsys.readouterr()
    assert code == 0, f"edgetune {argv[0]} exited {code}: {err[-2000:]}"
    return json.loads(out)


@pytest.mark.parametrize("arch", arch_params())
def test_init_prune_info_export(arch, images, parser, capsys, tmp_path):
    size = max(SMALLEST, BUILTIN_SIZES.get(arch, (0, 1))[1])
    init = edgetune(parser, capsys, "init", tmp_path / "m", "--arch", arch, "--classes-from", images, "--image-size", size)
    assert init["num_classes"] == len(CLASSES) and init["input_size"] == size

    prune = edgetune(parser, capsys, "prune", tmp_path / "m", "--data", images, "--level", "0.5", "--criterion", "activation",
                     "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet", "--out", tmp_path / "p")
    assert prune["params_before"] == init["params"]
    assert abs(prune["level_achieved"] - 0.5) <= 0.03, f"{arch}: removed {prune['level_achieved']:.3f} of parameters"

    info = edgetune(parser, capsys, "info", tmp_path / "p")
    assert info["arch"] == arch and info["class_names"] == list(CLASSES)
    assert info["params"] == prune["params_after"] and info["macs"] == prune["macs_after"]
    assert info["lineage"]["criterion"] == "activation"
    assert min(width for width in info["layers"].values() if width is not None) >= 1  # (a LayerNorm has no width here)

    onnx = tmp_path / "p.onnx"
    export = edgetune(parser, capsys, "export", tmp_path / "p", "--onnx", onnx)
    assert export["max_abs_diff_vs_torch"] is not None  # verified: it raises where onnxruntime disagrees
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, size, size)).astype(np.float32)
    assert session.run(["logits"], {"input": x})[0].shape == (3, len(CLASSES))
