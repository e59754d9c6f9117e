"""Torch-Pruning 1.6 needs help with a few torchvision networks; the fixes live here, each found
and checked by `bench/tp_survey.py` (which also verifies that the right channels are removed).

- `torch.chunk`/`split` under torch 2.x: TP infers wrong split sizes (ShuffleNetV2) → recompute them.
- ShuffleNetV2's `channel_shuffle` permutes channels in a way TP cannot map: trace with the
  shuffle as the identity and leave the convs that write into the shuffled trunk unpruned.
- ConvNeXt's `layer_scale` parameters: declare them, pruned along dim 0.
- Grouped (not depthwise) convs: TP's `round_to` compares per-group counts against totals and
  silently skips those layers, so rounding is turned off for such networks.
- Importing TP imports timm when it is installed (its op counter's hooks for vision-transformer
  attention), and timm imports torchvision and torch's compiler stack: seconds of every daemon
  start, for hooks no CNN needs. prune_core imports TP from here (`tp`), without timm.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterator

from torch import nn


def _import_without_timm() -> ModuleType:
    """torch_pruning, imported while `import timm` fails (unless timm or TP is already loaded)."""
    if "timm" in sys.modules or "torch_pruning" in sys.modules:
        return importlib.import_module("torch_pruning")
    sys.modules["timm"] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        return importlib.import_module("torch_pruning")
    finally:
        if sys.modules.get("timm", 0) is None:
            del sys.modules["timm"]


tp = _import_without_timm()


def grouped_convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups != m.out_channels]


@contextlib.contextmanager
def split_shape_fix() -> Iterator[None]:
    """While building a dependency graph, recompute chunk/split sizes from the saved autograd
    attributes (torch 2.x no longer saves `_saved_self_sizes`, which TP reads)."""
    from torch_pruning.dependency import shape_infer

    original = shape_infer.init_shape_information

    def patched(graph):
        original(graph)
        for node in graph.module2node.values():
            fn = node.grad_fn
            if (node.type == tp.ops.OPTYPE.SPLIT and hasattr(fn, "_saved_split_size")
                    and hasattr(fn, "_saved_self_sym_sizes") and fn._saved_dim == 1):
                total, size = int(fn._saved_self_sym_sizes[1]), int(fn._saved_split_size)
                sizes = [min(size, total - i) for i in range(0, total, size)]
                offsets = [0]
                for c in sizes:
                    offsets.append(offsets[-1] + c)
                node.module.split_sizes, node.module.offsets = sizes, offsets

    shape_infer.init_shape_information = patched
    try:
        yield
    finally:
        shape_infer.init_shape_information = original


@contextlib.contextmanager
def shufflenet_trace_patch() -> Iterator[None]:
    """Trace ShuffleNetV2 with channel_shuffle replaced by the identity."""
    import torchvision.models.shufflenetv2 as sv2

    original = sv2.channel_shuffle
    sv2.channel_shuffle = lambda x, groups: x
    try:
        yield
    finally:
        sv2.channel_shuffle = original


def shufflenet_trunk_convs(model: nn.Module) -> list[nn.Module]:
    """The convs whose outputs are concatenated and shuffled into the block output."""
    import torchvision.models.shufflenetv2 as sv2

    convs = []
    for block in model.modules():
        if isinstance(block, sv2.InvertedResidual):
            convs.append(block.branch2[5])
            if len(block.branch1) > 0:
                convs.append(block.branch1[2])
    return convs


def convnext_layer_scales(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    from torchvision.models.convnext import CNBlock

    return [(m.layer_scale, 0) for m in model.modules() if isinstance(m, CNBlock)]


@dataclass
class PrunerSetup:
    """What a MetaPruner for this model needs beyond the defaults."""

    ignored: list[nn.Module] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    allow_round_to: bool = True
    contexts: list = field(default_factory=list)

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for make in self.contexts:
                stack.enter_context(make())
            yield


def pruner_setup(model: nn.Module) -> PrunerSetup:
    """Workarounds chosen by the modules the model contains (not by its name)."""
    import torchvision.models.shufflenetv2 as sv2

    setup = PrunerSetup(contexts=[split_shape_fix])
    if any(isinstance(m, sv2.InvertedResidual) for m in model.modules()):
        setup.ignored += shufflenet_trunk_convs(model)
        setup.contexts.append(shufflenet_trace_patch)
    scales = convnext_layer_scales(model)
    if scales:
        setup.kwargs["unwrapped_parameters"] = scales
    setup.allow_round_to = not grouped_convs(model)
    return setup
