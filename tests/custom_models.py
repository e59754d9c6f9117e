"""Networks a user brings as `--arch custom_models:<factory>` (tests/ is on sys.path under pytest).

`build` is an ordinary small CNN of the user's own (a residual block, a depthwise-separable
stage, a width argument) that Torch-Pruning handles. `build_unprunable` hides a per-channel
*buffer* in a layer of its own: Torch-Pruning shrinks parameters, not buffers, so after a prune
that layer's scale no longer fits its input, and `edgetune init` must refuse it naming the layer.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class ChannelScale(nn.Module):
    """Multiplies each channel by a fixed factor kept in a buffer (not a parameter)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("factor", torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.factor.view(1, -1, 1, 1)


class UserNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16, scale_channels: bool = False):
        super().__init__()
        self.stem = _conv_bn(3, width)
        self.stage1 = Residual(width)
        self.down = _conv_bn(width, 2 * width, stride=2)
        self.scale = ChannelScale(2 * width) if scale_channels else nn.Identity()
        self.separable = nn.Sequential(_conv_bn(2 * width, 2 * width, groups=2 * width), _conv_bn(2 * width, 4 * width, kernel=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.scale(self.down(self.stage1(self.stem(x))))
        return self.head(torch.flatten(self.pool(self.separable(x)), 1))


def build(num_classes: int, width: int = 16) -> nn.Module:
    return UserNet(num_classes, width)


def build_unprunable(num_classes: int, width: int = 16) -> nn.Module:
    return UserNet(num_classes, width, scale_channels=True)


def not_a_module(num_classes: int) -> str:
    return "a model"
