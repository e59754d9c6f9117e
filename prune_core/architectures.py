"""The CNN architectures that edgetune can build, train and prune.

An architecture is named by one string (``arch_spec``): a built-in name from ``ARCHS``,
``timm:<model>`` for any model of the ``timm`` zoo, or ``<module>:<factory>`` for a user's own
``nn.Module``, built by calling ``factory(num_classes=..., **arch_kwargs)`` from an importable
module. Every model is built from scratch (``weights=None``, ``pretrained=False``); nothing here
touches the network: a user's weights come through ``edgetune init --weights``.  Each entry records the default input size used when the user gives
none (``image_size``) and the smallest square input the network runs at
(``min_image_size``, verified by running a forward pass at that size and
checking that one pixel less fails).

ImageNet-style networks get a small default size (64, or 96 for inception_v3)
so that training and pruning stay fast on a CPU; the ``cifar_*`` variants are
adapted to 32x32 inputs.

torchvision is imported when one of its networks is first built, not with this module: its import
pulls in torch's compiler stack, a large share of a daemon's start-up time that a daemon serving
``cifar_small`` never needs, and a restart after a crash or power loss waits for it.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from .arch_names import BUILTIN_SIZES, EXTERNAL_IMAGE_SIZE, TIMM_PREFIX, check_arch_name

__all__ = [
    "ArchSpec",
    "ARCHS",
    "CifarSmall",
    "arch_spec",
    "build_model",
    "check_arch_name",
    "classifier_module",
    "stem_module",
]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    image_size: int        # default input size used when a user gives none
    min_image_size: int    # smallest input the network runs at (1: not known in advance)
    build: Callable[[int], nn.Module]   # num_classes -> freshly initialised model


# ---------------------------------------------------------------------------
# CIFAR-style variants
# ---------------------------------------------------------------------------

def _cifar_resnet18(num_classes: int) -> nn.Module:
    """torchvision resnet18 with a 3x3/stride-1 stem and no max-pool.

    Feature maps at 32x32 input: 32 -> 32 (layer1) -> 16 -> 8 -> 4.
    """
    model = _tv("resnet18")(num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _cifar_mobilenet_v2(num_classes: int) -> nn.Module:
    """torchvision mobilenet_v2 adapted to 32x32 inputs (as in common CIFAR ports,
    e.g. kuangliu/pytorch-cifar).

    In torchvision's ``mobilenet_v2`` the stride-2 convolutions are
    ``features[0][0]`` (stem, 3->32), ``features[2].conv[1][0]`` (depthwise conv of
    the first block of the 24-channel stage, i.e. the second stage),
    ``features[4]``, ``features[7]`` and ``features[14]`` (depthwise convs).
    ``features[1]`` (the 16-channel stage) already has stride 1.  We set the
    stem and ``features[2].conv[1][0]`` to stride 1, so the total stride drops
    from 32 to 8: a 32x32 input ends in a 4x4 feature map.  ``features[2]``
    has no residual connection (16 != 24 channels), so changing its stride does
    not affect ``use_res_connect``.
    """
    model = _tv("mobilenet_v2")(num_classes)
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)
    model.features[2].stride = 1  # informational attribute of InvertedResidual
    return model


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _ResBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity, relu."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class CifarSmall(nn.Module):
    """Small, fast CIFAR-style CNN for demos and tests.

    Four conv-bn-relu blocks with 32-64-128-256 channels and one residual block:
    stem 3->32 @32x32, layer1 32->64 (stride 2) @16x16, layer2 64->128 (stride 2)
    @8x8 followed by a residual block (two 3x3 convs + identity), layer3
    128->256 (stride 2) @4x4, global average pool, linear.  0.69M parameters,
    34M MACs at 32x32.  A second residual block at 64ch@16x16 was left out: it
    cost more throughput than a demo network is worth (bench/RESULTS.md).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _ConvBNReLU(3, 32)
        self.layer1 = _ConvBNReLU(32, 64, stride=2)
        self.layer2 = nn.Sequential(_ConvBNReLU(64, 128, stride=2), _ResBlock(128))
        self.layer3 = _ConvBNReLU(128, 256, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.fc(self.flatten(self.pool(x)))


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

def _tv(name: str, **extra) -> Callable[[int], nn.Module]:
    """Builder of torchvision's ``models.<name>``, untrained."""
    def build(num_classes: int) -> nn.Module:
        fn = getattr(importlib.import_module("torchvision.models"), name)
        return fn(weights=None, num_classes=num_classes, **extra)
    return build


_NO_AUX = dict(aux_logits=False, init_weights=True, transform_input=False)

# The builder of every built-in name; names and sizes are arch_names.BUILTIN_SIZES.
_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "alexnet": _tv("alexnet"),
    "vgg11_bn": _tv("vgg11_bn"),
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "resnext50_32x4d": _tv("resnext50_32x4d"),
    "wide_resnet50_2": _tv("wide_resnet50_2"),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "densenet121": _tv("densenet121"),
    "googlenet": _tv("googlenet", **_NO_AUX),
    "inception_v3": _tv("inception_v3", **_NO_AUX),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "mnasnet1_0": _tv("mnasnet1_0"),
    "shufflenet_v2_x1_0": _tv("shufflenet_v2_x1_0"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "convnext_tiny": _tv("convnext_tiny"),
    "cifar_resnet18": _cifar_resnet18,
    "cifar_mobilenet_v2": _cifar_mobilenet_v2,
    "cifar_small": CifarSmall,
}

ARCHS: dict[str, ArchSpec] = {
    name: ArchSpec(name, size, min_size, _BUILDERS[name]) for name, (size, min_size) in BUILTIN_SIZES.items()
}
if set(_BUILDERS) != set(ARCHS):
    raise ImportError(f"builders without a size entry in arch_names: {sorted(set(_BUILDERS) - set(ARCHS))}")

# Keyword arguments edgetune sets itself when it builds a timm model.
_TIMM_RESERVED = ("pretrained", "num_classes", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def _timm_builder(name: str, kwargs: Mapping[str, Any]) -> Callable[[int], nn.Module]:
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise ValueError(f"architecture 'timm:{name}' needs the timm package (pip install timm)") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ValueError(f"timm has no model '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    reserved = sorted(set(kwargs) & set(_TIMM_RESERVED))
    if reserved:
        raise ValueError(f"arch kwargs may not set {', '.join(reserved)} (edgetune builds untrained models; weights come with --weights)")

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    return build


def _factory_builder(arch: str, kwargs: Mapping[str, Any]) -> Callable[[int], nn.Module]:
    module_name, _, attr_path = arch.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"architecture '{arch}': cannot import {module_name} ({exc}); is it installed or on PYTHONPATH?") from None
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"architecture '{arch}': {module_name} has no '{attr_path}'")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"architecture '{arch}': {attr_path} is not callable")

    def build(num_classes: int) -> nn.Module:
        try:
            model = target(num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise ValueError(f"architecture '{arch}': calling {attr_path}(num_classes=..., **arch_kwargs) failed: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"architecture '{arch}': {attr_path} returned {type(model).__name__}, not a torch nn.Module")
        return model

    return build


def arch_spec(arch: str, kwargs: Mapping[str, Any] | None = None) -> ArchSpec:
    """The ArchSpec `arch` names, its builder bound to `kwargs` (the factory's keyword arguments,
    recorded in model.json as ``arch_kwargs``; built-in architectures take none).

    Raises ValueError naming the problem: an unknown name, a missing package or factory."""
    kwargs = dict(kwargs or {})
    check_arch_name(arch)
    if arch in ARCHS:
        if kwargs:
            raise ValueError(f"built-in architecture '{arch}' takes no arch kwargs (got {', '.join(sorted(kwargs))})")
        return ARCHS[arch]
    if arch.startswith(TIMM_PREFIX):
        build = _timm_builder(arch[len(TIMM_PREFIX):], kwargs)
    else:
        build = _factory_builder(arch, kwargs)
    return ArchSpec(arch, EXTERNAL_IMAGE_SIZE, 1, build)


def build_model(arch: str, num_classes: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a freshly initialised (untrained) ``arch`` with ``num_classes`` outputs."""
    return arch_spec(arch, kwargs).build(num_classes)


def classifier_module(model: nn.Module) -> nn.Module:
    """The final layer producing the logits.

    That is the last ``nn.Linear`` of the model, or -- for models without any
    Linear layer (squeezenet) -- the last ``nn.Conv2d`` (squeezenet's final 1x1
    conv, ``classifier[1]``).  For every registered architecture module
    registration order equals execution order, so "last" is well defined.
    """
    last_linear = last_conv = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last_linear = m
        elif isinstance(m, nn.Conv2d):
            last_conv = m
    found = last_linear if last_linear is not None else last_conv
    if found is None:
        raise ValueError(f"no Linear or Conv2d layer in {type(model).__name__}")
    return found


def stem_module(model: nn.Module) -> nn.Module:
    """The first convolution of the network (the one that sees the image)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"no Conv2d layer in {type(model).__name__}")
