"""ONNX export for TensorRT on the Jetson, verified against torch under onnxruntime.

The exporter cannot write an adaptive average pool whose input is not a multiple of its output
(alexnet's 6×6 and vgg's 7×7 pools behind a small input's 1×1 or 2×2 feature map): such a pool is
exported as the same averages written as two matrix products (`PoolAsMatmul`)."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ATOL, RTOL = 1e-4, 1e-5  # onnxruntime against torch, as np.allclose: logits of untrained deep nets run to 1e5


class PoolAsMatmul(nn.Module):
    """`AdaptiveAvgPool2d(out)` on an `in_h`×`in_w` input, as `rows @ x @ cols`: each output cell the
    mean of the same input window torch's adaptive pool averages (start ⌊i·in/out⌋, end ⌈(i+1)·in/out⌉)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", self._means(in_size[0], out_size[0]))
        self.register_buffer("cols", self._means(in_size[1], out_size[1]).t().contiguous())

    @staticmethod
    def _means(n_in: int, n_out: int) -> torch.Tensor:
        weights = torch.zeros(n_out, n_in)
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            weights[i, start:end] = 1.0 / (end - start)
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


def exportable(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`model` (modified in place) with every adaptive average pool the exporter refuses at this
    input size replaced by its `PoolAsMatmul`."""
    seen: dict[str, tuple[int, int]] = {}
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    for name, size in seen.items():
        out = pools[name].output_size
        out = (out, out) if isinstance(out, int) else tuple(size[i] if o is None else o for i, o in enumerate(out))
        if any(s % o for s, o in zip(size, out)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, PoolAsMatmul(size, out))
    return model


def export_onnx(model: nn.Module, input_size: int, path: str | Path, opset: int = 17, verify: bool = True) -> float | None:
    """Write `model` as ONNX (dynamic batch) to `path`; with `verify`, return the largest absolute
    difference between onnxruntime's and torch's outputs on random input (raises where one is over
    ATOL + RTOL × |torch's|)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to("cpu").eval()
    example = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    exported = exportable(copy.deepcopy(model), example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exported, (example,), str(path), dynamo=False, opset_version=opset,
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
    if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
        worst = float(np.max(np.abs(got - want) - RTOL * np.abs(want)))
        raise RuntimeError(f"ONNX output differs from torch by {diff:.2e} (over {ATOL:g} + {RTOL:g}×|output| by {worst:.2e})")
    return diff
