"""Whether edgetune can prune a model, decided once at `edgetune init` by a trial on a copy.

A network a user brings (a timm model, their own module) may hold something Torch-Pruning's
dependency graph cannot follow: a per-channel buffer it does not shrink, a channel count written
into a reshape, an operation it cannot trace. Finding that out in the middle of a cycle would
waste the cycle; `check_prunable` finds it at init and names the layer. The trial does what a
cycle and a restart do, at a small level: trace and prune, run the pruned copy (inference, and a
training step), save it, load it back through the channel plan and check it computes the same,
and replay the recorded surgery on the unpruned model.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from .criteria import get_criterion
from .layer_errors import LayerError, first_line, naming_failing_layer
from .measure import count_params
from .model_format import ModelCard, ModelFormatError, channel_plan, load_model, save_model
from .surgery import prune_at_ratio, replay

TRIAL_RATIO = 0.25  # share of each layer's channels the trial removes
# Loaded and pruned copies run the same code on the same weights; only summation order may differ.
ATOL, RTOL = 1e-4, 1e-4


class UnprunableModel(ValueError):
    """A model edgetune cannot prune, run at its input size, or store; the message names the layer."""


@dataclass(frozen=True)
class Trial:
    """What the trial prune did: parameters before and after removing TRIAL_RATIO of the channels."""

    params_before: int
    params_after: int

    @property
    def level(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _run(model: nn.Module, x: torch.Tensor, what: str, train: bool = False) -> torch.Tensor:
    """model(x) (with a backward pass when `train`); a failure names the layer."""
    try:
        with naming_failing_layer(model):
            if train:
                model.train()
                out = model(x)
                out.float().sum().backward()
                return out.detach()
            with torch.no_grad():
                return model.eval()(x)
    except LayerError as exc:
        raise UnprunableModel(f"{what}: {exc}") from None


def _check_logits(out: torch.Tensor, batch: int, num_classes: int, what: str) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnprunableModel(f"{what}: the model returns {shape}, not logits of shape ({batch}, {num_classes})")


def _first_different_layer(a: nn.Module, b: nn.Module, x: torch.Tensor) -> str:
    """The first module (in execution order) whose output differs between `a` and `b` on `x`."""
    outputs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    order: list[str] = []

    def hook_all(model: nn.Module, key: str):
        handles = []
        for name, module in model.named_modules():
            def hook(module, args, out, name=name):
                if isinstance(out, torch.Tensor):
                    outputs[key].append(out.detach())
                    if key == "a":
                        order.append(name)
            handles.append(module.register_forward_hook(hook))
        return handles

    handles = hook_all(a, "a") + hook_all(b, "b")
    try:
        with torch.no_grad():
            a.eval()(x)
            b.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    for name, out_a, out_b in zip(order, outputs["a"], outputs["b"]):
        if out_a.shape != out_b.shape or not torch.allclose(out_a, out_b, atol=ATOL, rtol=RTOL):
            return name or "(the model itself)"
    return "(none found)"


def check_prunable(model: nn.Module, card: ModelCard) -> Trial:
    """Raise UnprunableModel, naming the layer, unless `model` (described by `card`) runs at the
    card's input size and prunes, saves, loads and replays correctly. `model` is not modified."""
    size, classes, arch = card.input_size, card.num_classes, card.arch
    base = copy.deepcopy(model).to("cpu").eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=generator)
    batch = torch.randn(2, 3, size, size, generator=generator)
    _check_logits(_run(base, x, f"{arch} does not run at input size {size}"), 1, classes, arch)

    try:
        outcome = prune_at_ratio(base, get_criterion("l1").score(base), TRIAL_RATIO, size)
    except LayerError as exc:
        raise UnprunableModel(f"{arch} cannot be pruned: {exc}") from None
    except Exception as exc:  # a failure outside any layer (Torch-Pruning's graph building)
        raise UnprunableModel(f"{arch} cannot be pruned: Torch-Pruning failed ({first_line(exc)})") from None
    pruned = outcome.model.eval()
    after = f"{arch} cannot be pruned (a trial prune of {TRIAL_RATIO:.0%} of its channels breaks it)"
    _check_logits(_run(pruned, x, after), 1, classes, after)
    if outcome.params_after >= outcome.params_before:
        raise UnprunableModel(f"{arch} cannot be pruned: Torch-Pruning found no channel it can remove")

    with tempfile.TemporaryDirectory(prefix="edgetune-trial-") as tmp:
        try:
            save_model(pruned, copy.deepcopy(card), tmp)
            loaded, _ = load_model(tmp)
        except (ModelFormatError, RuntimeError) as exc:
            raise UnprunableModel(f"{arch} cannot be pruned (once pruned, it cannot be stored and loaded): {first_line(exc)}") from None
    got, want = _run(loaded, x, after), _run(pruned, x, after)
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        layer = _first_different_layer(loaded, pruned, x)
        raise UnprunableModel(f"{arch} cannot be pruned (once pruned, it computes differently when loaded): layer '{layer}' "
                              "keeps state the channel plan does not describe")

    try:
        replayed = replay(base, outcome.history, size)
    except LayerError as exc:
        raise UnprunableModel(f"{arch}: the recorded surgery does not replay: {exc}") from None
    plan, expected = channel_plan(replayed), channel_plan(pruned)
    if plan != expected:
        layer = next(n for n in sorted(set(plan) | set(expected)) if plan.get(n) != expected.get(n))
        raise UnprunableModel(f"{arch}: the recorded surgery replays differently at layer '{layer}'")

    trained = f"{arch} cannot be trained once pruned"
    _check_logits(_run(loaded, batch, trained, train=True), 2, classes, trained)
    return Trial(outcome.params_before, count_params(pruned))
