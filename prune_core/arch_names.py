"""Which architecture names a model card may carry, checked without torch.

The built-in names and their input sizes live here, not beside their builders in
`architectures` (which needs torch), so a serving process can read and validate a model.json
without importing torch; `architectures` pairs each name with its builder.
"""
from __future__ import annotations

import difflib
import re

# name -> (default input size used when a user gives none, smallest input the network runs at:
# verified by a forward pass; 1 when not known in advance)
BUILTIN_SIZES: dict[str, tuple[int, int]] = {
    "alexnet": (64, 63),
    "vgg11_bn": (64, 32),
    "resnet18": (64, 1),
    "resnet50": (64, 1),
    "resnext50_32x4d": (64, 1),
    "wide_resnet50_2": (64, 1),
    "squeezenet1_1": (64, 17),
    "densenet121": (64, 29),
    "googlenet": (64, 15),
    "inception_v3": (96, 75),
    "mobilenet_v2": (64, 1),
    "mobilenet_v3_small": (64, 1),
    "mnasnet1_0": (64, 1),
    "shufflenet_v2_x1_0": (64, 1),
    "efficientnet_b0": (64, 1),
    "regnet_y_400mf": (64, 1),
    "convnext_tiny": (64, 32),
    "cifar_resnet18": (32, 1),
    "cifar_mobilenet_v2": (32, 1),
    "cifar_small": (32, 1),
}

TIMM_PREFIX = "timm:"
# Default input size of architectures outside the built-ins, like the torchvision ones': small
# enough to train on a CPU; their smallest input is not known in advance (`edgetune init` runs one).
EXTERNAL_IMAGE_SIZE = 64
FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def check_arch_name(arch: str) -> None:
    """Raise ValueError unless `arch` is a built-in name, ``timm:<model>`` or ``<module>:<factory>``.

    Only the spelling is checked: nothing is imported (a model.json is read without running code)."""
    if arch in BUILTIN_SIZES:
        return
    if arch.startswith(TIMM_PREFIX):
        if arch[len(TIMM_PREFIX):].strip():
            return
        raise ValueError(f"architecture '{arch}' names no timm model (e.g. timm:resnet18)")
    if ":" in arch:
        if FACTORY_PATTERN.fullmatch(arch):
            return
        raise ValueError(f"architecture '{arch}' is not of the form package.module:factory")
    close = difflib.get_close_matches(arch, BUILTIN_SIZES, n=3)
    raise ValueError(
        f"unknown architecture '{arch}'; choose from {', '.join(sorted(BUILTIN_SIZES))}, timm:<model> or package.module:factory"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
    )
