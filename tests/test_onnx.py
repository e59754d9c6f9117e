"""prune_core.onnx_export: exported graphs match torch under onnxruntime, with a dynamic batch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from prune_core.architectures import build_model
from prune_core.onnx_export import PoolAsMatmul, export_onnx


def check_dynamic_batch(path, model: torch.nn.Module, size: int, num_classes: int) -> None:
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    for n in (1, 3):
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(10 + n))
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (n, num_classes)
        assert np.abs(want).max() > 1e-3, "outputs too small for the comparison to mean anything"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_pruned_cifar_small(tmp_path, pruned_cifar_small):
    _, outcome = pruned_cifar_small
    pruned = outcome.model.eval()
    path = tmp_path / "sub" / "pruned.onnx"  # parent folders are created
    diff = export_onnx(pruned, 32, path)
    assert path.is_file()
    assert diff is not None and 0 <= diff <= 1e-4
    check_dynamic_batch(path, pruned, 32, 10)
    assert not pruned.training  # the model handed in is left as it was


def test_mobilenet_v2_at_64(tmp_path, randomise_bn):
    torch.manual_seed(0)
    model = randomise_bn(build_model("mobilenet_v2", 5), seed=2)
    with torch.no_grad():  # untrained classifier weights are ~0.01: make the logits sizeable
        model.classifier[-1].weight.mul_(100)
    path = tmp_path / "mbv2.onnx"
    diff = export_onnx(model, 64, path)
    assert diff is not None and diff <= 1e-4
    check_dynamic_batch(path, model, 64, 5)


def test_without_verification(tmp_path):
    model = build_model("cifar_small", 3).eval()
    assert export_onnx(model, 32, tmp_path / "m.onnx", verify=False) is None
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


@pytest.mark.parametrize("in_size,out_size", [((1, 1), (6, 6)), ((2, 2), (7, 7)), ((5, 3), (7, 2)), ((13, 13), (6, 6)), ((3, 9), (1, 1))])
def test_an_adaptive_pool_as_matrix_products_averages_the_same_windows(in_size, out_size):
    x = torch.randn(2, 4, *in_size, generator=torch.Generator().manual_seed(0))
    want = torch.nn.AdaptiveAvgPool2d(out_size)(x)
    torch.testing.assert_close(PoolAsMatmul(in_size, out_size)(x), want, rtol=1e-6, atol=1e-6)


def test_a_pool_the_exporter_refuses_is_exported_as_matrix_products(tmp_path):
    """vgg's 7×7 adaptive pool behind a 32-pixel input's 1×1 feature map: torch.onnx refuses it
    (output not a factor of the input); exported through PoolAsMatmul, onnxruntime matches torch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d((7, 7)), torch.nn.Flatten(), torch.nn.Linear(8 * 49, 3),
    ).eval()
    assert export_onnx(model, 9, tmp_path / "m.onnx") <= 1e-4  # 9 pixels: a 2x2 map pooled to 7x7
    check_dynamic_batch(tmp_path / "m.onnx", model, 9, 3)
    assert isinstance(model[2], torch.nn.AdaptiveAvgPool2d)  # the caller's model is left as it was
