"""The frozen front of a partial retraining run, run apart from the part that trains: in micro-batches,
without a graph, its normalisation layers in eval mode.

Why: without a graph the front keeps no activation for backward (prune_core.scope), but it still runs
forward at the training batch size, and that pass's own peak (the largest intermediate, convolution
workspaces, layout copies) is about what a `last` run measures. Run in micro-batches of
`batch / chunks` images, its peak shrinks with the micro-batch; the trainable part still trains on
the whole batch (the micro-batches' outputs concatenated).

Where: the cut is the first module of the trainable part that a forward pass reaches, taken as high
in the module tree as it can be (a whole stage, `layer3`, rather than its first convolution, so a
residual branch that reads the stage's input is inside it). Nothing is assumed about the model's
`forward`: a probe checks, on a few real images, that the cut is called once per forward, that
nothing before it trains, that its inputs are batch-first tensors, and that the split forward gives
the whole forward's output. Where a check fails, the model runs whole, as before, and the reason says
why.

How, without knowing `forward`: a forward pre-hook on the cut captures its input and stops the
forward there (front micro-batches, under no_grad); then the model runs on an empty batch and the
hook hands the cut the concatenated inputs, so everything from the cut on runs on the whole batch. The
front's layers run on zero images (no cost); a tensor that crossed the cut some other way would
carry a batch of zero against the whole batch and fail the probe rather than broadcast.

Eval mode: batch statistics over a micro-batch are not those of the batch, so the front's
normalisation layers use their running statistics; `recalibrate` first re-estimates them on the
training images (after pruning, the statistics behind a pruned layer are stale), once, without a graph.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from .options import RetrainScope
from .scope import ScopePlan

__all__ = ["FrontSplit", "split_front", "whole_because"]

PROBE_IMAGES = 4  # images the probe runs, in micro-batches of 2


class _Reached(Exception):
    """Raised by the capture hook: the forward reached the cut, the rest is not needed."""


@dataclass
class _Capture:
    args: tuple | None = None
    calls: int = 0


@contextmanager
def _modes(modules: Iterable[nn.Module], training: bool) -> Iterator[None]:
    """`modules` (not their children) in `training` mode, restored on exit."""
    before = [(m, m.training) for m in modules]
    for m, _ in before:
        m.training = training
    try:
        yield
    finally:
        for m, was in before:
            m.training = was


class FrontSplit:
    """`model`'s forward with the front (the modules run before `cut`) in micro-batches of `chunk`
    images, without a graph and in eval mode, and the rest on the whole batch."""

    def __init__(self, model: nn.Module, cut_name: str, front: tuple[nn.Module, ...], chunk: int):
        self.model, self.cut_name, self.front, self.chunk = model, cut_name, front, max(1, chunk)
        self.cut = model.get_submodule(cut_name)

    def describe(self) -> str:
        return f"front up to '{self.cut_name}' in micro-batches of {self.chunk}"

    def _capture(self, x: torch.Tensor) -> tuple:
        """The cut's positional inputs for `x` (the forward stops there)."""
        got = _Capture()

        def hook(module, args):
            got.args = args
            raise _Reached

        handle = self.cut.register_forward_pre_hook(hook)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if got.args is None:
            raise RuntimeError(f"the forward pass did not reach '{self.cut_name}'")
        return got.args

    def front_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The cut's inputs for the whole batch `x`, computed in micro-batches without a graph."""
        with torch.no_grad(), _modes(self.front, False):
            parts = [self._capture(part) for part in x.split(self.chunk)]
        return tuple(torch.cat(column) for column in zip(*parts))

    def rest(self, x: torch.Tensor, inputs: tuple[torch.Tensor, ...], calls: _Capture | None = None) -> torch.Tensor:
        """The model's output with the cut fed `inputs`: the front runs on an empty batch."""
        calls = calls if calls is not None else _Capture()

        def hook(module, args):
            calls.calls += 1
            return inputs

        handle = self.cut.register_forward_pre_hook(hook)
        try:
            with _modes(self.front, False):
                return self.model(x[:0])
        finally:
            handle.remove()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(x, self.front_inputs(x))

    @torch.no_grad()
    def recalibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Re-estimate the running statistics of the front's normalisation layers on `batches` (a
        cumulative average over every micro-batch), so eval mode uses statistics of the data."""
        norms = [m for m in self.front if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return
        saved = [(m, m.momentum) for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        try:
            with _modes(self.front, False), _modes(norms, True):
                for x in batches:
                    for part in x.split(self.chunk):
                        if part.shape[0] > 1:
                            self._capture(part)
        finally:
            for m, momentum in saved:
                m.momentum = momentum


def _cut_candidates(plan: ScopePlan) -> list[str]:
    """The first trained layer and its ancestors below the model, innermost first: the tightest cut
    first; an ancestor where the layer's input is not the only way in (a residual branch reads the
    block's input, a dense block's layers read each other's) runs the block's frozen layers with the
    rest, at the whole batch, as before."""
    parts = plan.first_trained_layer.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _probe(model: nn.Module, cut_name: str, x: torch.Tensor, chunk: int) -> FrontSplit | str:
    """A FrontSplit at `cut_name` if it computes `model`'s forward on `x`; else why not."""
    cut = model.get_submodule(cut_name)
    ancestors = {id(model.get_submodule(".".join(cut_name.split(".")[:i]))) for i in range(len(cut_name.split(".")))}
    ran: list[nn.Module] = []
    reached = _Capture()

    def record(module, args):
        if reached.calls == 0 and id(module) not in ancestors:
            ran.append(module)

    def at_cut(module, args):
        reached.calls += 1

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if m is not cut]
    handles.append(cut.register_forward_pre_hook(at_cut))
    try:
        reference = model(x)  # grad enabled: what the front gives must not need one
    finally:
        for h in handles:
            h.remove()
    if reached.calls != 1:
        return f"'{cut_name}' runs {reached.calls} times per forward pass"
    front = tuple(dict.fromkeys(ran))  # in execution order, once each
    if not front:
        return f"nothing runs before '{cut_name}'"
    if any(p.requires_grad for m in front for p in m.parameters(recurse=False)):
        return f"a layer that runs before '{cut_name}' trains"
    split = FrontSplit(model, cut_name, front, chunk)
    with torch.no_grad():
        inputs = split._capture(x)
        if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == x.shape[0] for t in inputs):
            return f"'{cut_name}' takes other inputs than batch-first tensors"
        if any(t.requires_grad for t in inputs):
            return f"the input of '{cut_name}' needs a graph"
        calls = _Capture()
        try:
            got = split.rest(x, split.front_inputs(x), calls)
        except Exception as exc:  # noqa: BLE001 - any failure means the model's forward does not split there
            return f"the forward pass does not split at '{cut_name}' ({type(exc).__name__}: {exc})"
    reference = reference.detach()
    if calls.calls != 1 or not isinstance(got, torch.Tensor) or got.shape != reference.shape:
        return f"the forward pass does not split at '{cut_name}'"
    if not torch.allclose(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()) + 1e-6):
        return f"the forward pass split at '{cut_name}' gives another output"
    return split


def whole_because(plan: ScopePlan, chunks: int) -> str:
    """Why `plan` runs its front with the rest without even probing a split ("" where it may split)."""
    if plan.scope is not RetrainScope.LAST or plan.first_trained_layer is None:
        return f"scope '{plan.scope.value}' has no frozen front to run apart"
    if chunks <= 1:
        return "one micro-batch: the front runs with the rest"
    return ""


def split_front(model: nn.Module, plan: ScopePlan, probe: torch.Tensor, chunks: int) -> FrontSplit | str:
    """How `model`, frozen by `plan` (applied), runs its front apart in `chunks` micro-batches of a
    batch the size of `probe`: a FrontSplit, or the reason it runs whole (the probe's first few images
    check the split; the model is left in its mode)."""
    why_not = whole_because(plan, chunks)
    if why_not:
        return why_not
    candidates = _cut_candidates(plan)
    was_training = model.training
    model.eval()
    reason = ""
    try:
        x = probe[:PROBE_IMAGES]
        for name in candidates:
            found = _probe(model, name, x, max(1, x.shape[0] // 2))
            if isinstance(found, FrontSplit):
                found.chunk = max(1, -(-probe.shape[0] // chunks))
                return found
            reason = reason or found
    finally:
        model.train(was_training)
    return reason
