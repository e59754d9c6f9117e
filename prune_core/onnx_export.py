"""ONNX export for TensorRT on the Jetson, verified against torch under onnxruntime."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def export_onnx(model: nn.Module, input_size: int, path: str | Path, opset: int = 17, verify: bool = True) -> float | None:
    """Write `model` as ONNX (dynamic batch) to `path`; with `verify`, return the largest absolute
    difference between onnxruntime's and torch's outputs on random input (raises if > 1e-4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to("cpu").eval()
    example = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    if not verify:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": example.numpy()})[0]
    with torch.no_grad():
        want = model(example).numpy()
    diff = float(np.max(np.abs(got - want)))
    if diff > 1e-4:
        raise RuntimeError(f"ONNX output differs from torch by {diff:.2e} (> 1e-4)")
    return diff
