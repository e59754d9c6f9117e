"""Loading named tensors into a model without losing its modules' versions.

`nn.Module.state_dict()` carries `_metadata`: each module's `_version`, which some modules'
`_load_from_state_dict` require (torchvision's MNASNet raises "version should be set to 1 or 2
instead of None" without it). Any plain dict of tensors — a safetensors file, a filtered or
merged copy — has lost it; the model being loaded into describes the same code, so its own
metadata is the right one to attach. Every `load_state_dict` in prune_core goes through here.
"""
from __future__ import annotations

import collections
from typing import Mapping

import torch
from torch import nn


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """`model.load_state_dict(tensors, strict)` with `model`'s own state-dict metadata (module versions)."""
    state = collections.OrderedDict(tensors)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=strict)
