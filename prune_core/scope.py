"""Partial retraining: which parameters a run updates (`RetrainScope`), and a frozen front that keeps
no graph, so the activations of the layers that do not train are never stored for the backward pass.

The last stages of any network. The rule needs no knowledge of the architecture: the network's
weight layers are the modules that own a weight of two or more dimensions (convolutions and linear
layers, whatever their class: torchvision's, timm's or a user's), in module order; the last
``ceil(last_share * n)`` of them, and every module registered from the first of them on, train.
Module order is execution order in torchvision, timm and the CIFAR networks (the classifier is
found the same way, prune_core.architectures.classifier_module). A share of the weight layers
rather than of the parameters: the last stages of a CNN hold most of its parameters (a share of
them would be a part of one stage), while its cost in time and activations is spread over its depth.

No graph for the frozen front. Autograd records an operation only when one of its inputs requires
grad; the image does not, and neither do the frozen parameters, so every layer before the first one
that trains runs as under ``torch.no_grad()``: it keeps no activation for the backward pass, and
the gradient stops there. No hook and no assumption on module order are needed, and wherever a
frozen layer runs after a trainable one, the gradient flows through it as it must.

Frozen modules keep their train/eval mode here: the batch-norm layers of a frozen front still
normalise with batch statistics and update their running statistics (no graph is needed for that;
after pruning, the statistics behind a pruned layer are stale). Where `train` runs the front of a
`last` run apart, in micro-batches (prune_core.front), it re-estimates those statistics on the
training images once and then runs the front in eval mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import classifier_module
from .options import RetrainScope, parse_last_share, parse_scope

__all__ = ["RetrainScope", "ScopePlan", "Frozen", "plan_scope", "weight_layers"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the modules owning a weight of two or more dimensions (conv, linear), in module order."""
    names = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            names.append(name)
    return names


@dataclass(frozen=True)
class ScopePlan:
    """The parameters a run with `scope` updates in one model, by name."""

    scope: RetrainScope
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    first_trained_layer: str | None  # the first weight layer of the last stages (last, last_bn), else None
    trainable_params: int  # elements
    params: int
    last_share: float | None = None  # the share of the weight layers the last stages hold (last, last_bn)

    def to_dict(self) -> dict:
        return {
            "scope": self.scope.value,
            "first_trained_layer": self.first_trained_layer,
            "last_share": self.last_share,
            "trainable_params": self.trainable_params,
            "trainable_share": self.trainable_params / self.params if self.params else 0.0,
        }


def _last_stage_modules(model: nn.Module, last_share: float) -> tuple[set[str], str]:
    """Names of the modules from the first of the last `last_share` weight layers on (module order)."""
    layers = weight_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no convolution or linear layer to retrain")
    first = layers[len(layers) - max(1, math.ceil(last_share * len(layers)))]
    names = [name for name, _ in model.named_modules()]
    return set(names[names.index(first):]), first


def plan_scope(model: nn.Module, scope: RetrainScope | str, last_share: float) -> ScopePlan:
    """Which of `model`'s parameters (those that require grad now) a run with `scope` trains.

    `last_share` (0 < share ≤ 1) is the share of the weight layers the last stages hold (last, last_bn)."""
    scope, last_share = parse_scope(scope), parse_last_share(last_share)
    staged = scope in (RetrainScope.LAST, RetrainScope.LAST_BN)
    stages, first = (set(), None)
    if staged:
        stages, first = _last_stage_modules(model, last_share)
    classifier = classifier_module(model) if scope is RetrainScope.BIAS else None
    trainable, frozen, count, total = [], [], 0, 0
    seen: set[int] = set()  # a parameter shared by two modules is planned once, under its first name
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{attr}" if module_name else attr
            total += param.numel()
            if scope is RetrainScope.FULL:
                chosen = True
            elif scope is RetrainScope.LAST:
                chosen = module_name in stages
            elif scope is RetrainScope.LAST_BN:
                chosen = module_name in stages or isinstance(module, _NORMS)
            else:  # BIAS
                chosen = attr == "bias" or isinstance(module, _NORMS) or module is classifier
            if chosen and param.requires_grad:
                trainable.append(name)
                count += param.numel()
            else:
                frozen.append(name)
    if not trainable:
        raise ValueError(f"retrain scope '{scope.value}' leaves no parameter of {type(model).__name__} to train")
    return ScopePlan(scope, tuple(trainable), tuple(frozen), first, count, total, last_share if staged else None)


class Frozen:
    """`plan` applied to `model`: its frozen parameters stop requiring grad (so the optimizer never
    sees them and no graph is built before the first trainable layer). `release` restores them."""

    def __init__(self, model: nn.Module, plan: ScopePlan):
        self.model, self.plan = model, plan
        params = dict(model.named_parameters())
        self._restore = [params[name] for name in plan.frozen if params[name].requires_grad]
        for param in self._restore:
            param.requires_grad_(False)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in the model's order (what the optimizer gets)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def release(self) -> None:
        for param in self._restore:
            param.requires_grad_(True)
        self._restore = []
