"""Ranking criteria: how important each output channel of each layer is (higher = keep).

A criterion returns `{module name: per-channel scores}`. Data-agnostic criteria read the weights;
data-aware ones stream batches of the device's own samples through the model and keep only
per-channel running sums, so memory does not grow with the number of samples.

Adding a criterion is one small class:

    @register
    class MyCriterion(Criterion):
        name = "mine"
        def score(self, model, batches=None):
            return {name: ... for name, module in prunable_layers(model)}
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Dict, Iterable, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .options import BUILTIN_CRITERIA, parse_criteria  # noqa: F401 (parse_criteria: re-exported)

# typing's spellings: these aliases are evaluated at import, and JetPack 5's Python is 3.8
Batch = Tuple[torch.Tensor, torch.Tensor]
Scores = Dict[str, torch.Tensor]
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
WEIGHT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

CRITERIA: dict[str, type["Criterion"]] = {}


def register(cls: type["Criterion"]) -> type["Criterion"]:
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **options) -> "Criterion":
    try:
        return CRITERIA[name](**options)
    except KeyError:
        raise ValueError(f"unknown criterion '{name}'; choose from {', '.join(sorted(CRITERIA))}") from None




def prunable_layers(model: nn.Module, types: tuple[type, ...] = WEIGHT_TYPES) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, types) and getattr(module, "weight", None) is not None:
            if not getattr(module, "transposed", False):
                yield name, module


def channel_count(module: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return int(module.normalized_shape[-1])


class Criterion(ABC):
    """Scores output channels. `prefer_norm_layers`: rank a coupled group by its norm layers' scores
    (the activations that feed the non-linearity) rather than by the convolutions'."""

    name: ClassVar[str]
    data_aware: ClassVar[bool] = False
    backward: ClassVar[bool] = False  # ranks by gradients: each calibration batch costs a backward pass too
    prefer_norm_layers: ClassVar[bool] = False

    def __init__(self, seed: int = 0, max_batches: int | None = None):
        self.seed = seed
        self.max_batches = max_batches

    @abstractmethod
    def score(self, model: nn.Module, batches: Iterable[Batch] | None = None) -> Scores:
        """Per-channel scores for the output channels of the model's layers."""

    def _limited(self, batches: Iterable[Batch] | None) -> Iterator[Batch]:
        if batches is None:
            raise ValueError(f"criterion '{self.name}' ranks on data: give it batches of samples")
        for i, batch in enumerate(batches):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield batch


@register
class L1(Criterion):
    """Filter L1 norm (Li et al., ICLR 2017): small filters contribute little."""

    name = "l1"

    @torch.no_grad()
    def score(self, model, batches=None):
        return {n: m.weight.detach().abs().flatten(1).sum(1).float().cpu() for n, m in prunable_layers(model)}


@register
class Random(Criterion):
    """Uniformly random scores: the baseline every criterion must beat."""

    name = "random"

    def score(self, model, batches=None):
        gen = torch.Generator().manual_seed(self.seed)
        return {n: torch.rand(channel_count(m), generator=gen) for n, m in prunable_layers(model)}


class _ActivationStatistic(Criterion):
    """Streams batches with forward hooks on conv/linear/norm layers, summing per-channel statistics."""

    data_aware = True
    prefer_norm_layers = True

    @abstractmethod
    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Per-channel sum of the statistic over a batch; `out` is (elements, channels)."""

    @abstractmethod
    def _finish(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """Turn the summed statistic into an importance (higher = keep)."""

    @torch.no_grad()
    def score(self, model, batches=None):
        layers = dict(prunable_layers(model, WEIGHT_TYPES + NORM_TYPES))
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name: str, channels: int):
            def fn(_module, _inputs, out):
                if not isinstance(out, torch.Tensor):
                    return
                dim = 1 if out.dim() > 1 and out.shape[1] == channels else out.dim() - 1
                flat = out.detach().movedim(dim, -1).reshape(-1, channels).float()
                sums[name] = sums.get(name, 0) + self._reduce(flat).cpu()
                counts[name] = counts.get(name, 0) + flat.shape[0]

            return fn

        handles = [m.register_forward_hook(hook(n, channel_count(m))) for n, m in layers.items()]
        was_training = model.training
        model.eval()
        try:
            for x, _ in self._limited(batches):
                model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if not counts:
            raise ValueError(f"criterion '{self.name}' saw no samples")
        return {n: self._finish(sums[n], counts[n]) for n in sums}


@register
class Activation(_ActivationStatistic):
    """Mean activation per channel after the non-linearity (taken as max(x, 0) of the normalised
    pre-activation) on the device's data: channels that stay quiet on the classes this device
    sees are the ones to remove. A channel that is always negative is dead, not important."""

    name = "activation"

    def _reduce(self, out):
        return out.clamp(min=0).sum(0)

    def _finish(self, total, count):
        return total / count


@register
class APoZ(_ActivationStatistic):
    """Average Percentage of Zeros after ReLU (Hu et al., 2016): measured as the share of
    non-positive pre-activation values; importance = 1 − APoZ."""

    name = "apoz"

    def _reduce(self, out):
        return (out <= 0).float().sum(0)

    def _finish(self, total, count):
        return 1.0 - total / count


@register
class Taylor(Criterion):
    """First-order Taylor estimate of the loss change when a channel is removed (Molchanov et al.,
    CVPR 2019): (Σ gate·∂L/∂gate)² per minibatch, averaged, with BN affine parameters as gates and
    filter weights where no BN follows. Targets are the labels, or the model's own predictions for
    unlabelled samples."""

    name = "taylor"
    data_aware = True
    backward = True
    prefer_norm_layers = True

    def score(self, model, batches=None):
        layers = dict(prunable_layers(model, WEIGHT_TYPES + NORM_TYPES))
        totals: dict[str, torch.Tensor] = {}
        n_batches = 0
        was_training = model.training
        model.eval()
        grads_before = {id(p): p.grad for p in model.parameters()}
        try:
            for x, y in self._limited(batches):
                model.zero_grad(set_to_none=True)
                logits = model(x)
                target = torch.where(y >= 0, y, logits.detach().argmax(1))
                F.cross_entropy(logits, target).backward()
                for name, module in layers.items():
                    w = module.weight
                    if w.grad is None:
                        continue
                    contrib = (w * w.grad).detach()
                    contrib = contrib.flatten(1).sum(1) if contrib.dim() > 1 else contrib
                    if isinstance(module, NORM_TYPES) and getattr(module, "bias", None) is not None and module.bias.grad is not None:
                        contrib = contrib + (module.bias * module.bias.grad).detach()
                    totals[name] = totals.get(name, 0) + contrib.pow(2).float().cpu()
                n_batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad = grads_before.get(id(p))
            model.train(was_training)
        if not n_batches:
            raise ValueError("criterion 'taylor' saw no samples")
        return {n: t / n_batches for n, t in totals.items()}


if set(CRITERIA) != set(BUILTIN_CRITERIA):
    raise ImportError(f"options.BUILTIN_CRITERIA {sorted(BUILTIN_CRITERIA)} != the registered criteria {sorted(CRITERIA)}")
