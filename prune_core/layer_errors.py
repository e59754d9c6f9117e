"""Failures named by the layer they happened in: a forward pass (or a trace) of a model, or a
pruning step of one of Torch-Pruning's dependency groups.

A user who brings their own network needs to know which of its layers edgetune cannot run or
prune, not a stack trace from inside torch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


class LayerError(RuntimeError):
    """Something failed in `layer` (a module name of the model, '' for the model itself)."""

    def __init__(self, layer: str, reason: str):
        self.layer, self.reason = layer, reason
        super().__init__(f"layer '{layer or '(the model itself)'}': {reason}")


def first_line(exc: BaseException) -> str:
    """`exc` as one line: its message's first line, or its type."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextlib.contextmanager
def naming_failing_layer(model: nn.Module) -> Iterator[None]:
    """Turn an exception raised during a forward pass of `model` inside the block into a
    LayerError naming the innermost module that was running.

    The hooks that track it are removed when the block ends; do not deep-copy `model` inside it
    (the copy would keep them)."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []

    def enter(module, args):
        running.append(names.get(module, type(module).__name__))

    def leave(module, args, output):
        running.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    except LayerError:
        raise
    except Exception as exc:
        if not running:
            raise
        raise LayerError(running[-1], first_line(exc)) from exc
    finally:
        for handle in handles:
            handle.remove()
