"""Initial weights a user brings to `edgetune init --weights`: read without running code, fitted
to the model by name.

Accepted: a safetensors file; a torch file holding a state dict, read with `weights_only=True`
(no arbitrary object is unpickled), bare or nested the way training scripts save it
(``{"state_dict": ...}``, ``{"model": ...}``, timm's train.py checkpoints with their argparse
``args``); key prefixes of DataParallel (``module.``) and torch.compile (``_orig_mod.``).
The classifier may be named differently in the file (``fc``, ``head.fc``, ``classifier``,
``head``, ...: it is mapped onto the model's) or have another class count (everything else is
loaded and the classifier starts untrained, which `WeightsFit.notes` says). Anything else that
does not match is refused, naming the keys.
"""
from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from .architectures import classifier_module
from .state_dict import load_tensors

StateDict = Dict[str, torch.Tensor]
# Where training scripts nest the state dict in a checkpoint, most specific first.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Prefixes wrappers add to every key: (Distributed)DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Classifier names of torchvision, timm and other zoos; a trailing index (classifier.1) is allowed.
CLASSIFIER_NAMES = ("fc", "head.fc", "head", "classifier", "last_linear", "logits", "head.l")
SHOWN_KEYS = 4
OPTIONAL_SUFFIX = "num_batches_tracked"  # absent from checkpoints of old torch versions: the model's own value is kept


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; one line naming the problem."""


@dataclass
class WeightsFit:
    """How a weights file was fitted to the model."""

    loaded: int  # tensors taken from the file
    renamed: Dict[str, str] = field(default_factory=dict)  # file prefix -> model prefix (the classifier)
    untrained: List[str] = field(default_factory=list)  # model prefixes left at their fresh initialisation
    notes: List[str] = field(default_factory=list)  # what the user should know, one line each


def _shown(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN_KEYS]) + (f", … ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else "")


def _safe_globals():
    """Allow argparse.Namespace (timm's train.py stores its arguments with the weights): a plain
    attribute bag, so still no code runs. Older torch has no allow-list (and no such files)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext()


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then the JSON header


def _unwrap(obj, path: Path) -> StateDict:
    """The state dict inside what torch.load returned."""
    for _ in range(3):  # {"model": {"state_dict": ...}} at most
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        nested = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"weights file '{path}' does not hold a state dict")
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsError(f"weights file '{path}' holds a dict with entries that are not tensors ({_shown(others)}), not a state dict")
    return {str(k): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> StateDict:
    """The tensors of a weights file (safetensors, or a torch state dict read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' not found")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        with _safe_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: pickle, safetensors, zip and OS errors alike
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = (f"it holds Python objects besides tensors, which edgetune does not unpickle ({first}); "
                     "save model.state_dict() alone, or as safetensors")
        raise WeightsError(f"weights file '{path}' is unreadable: {first}") from None
    return _unwrap(obj, path)


def _strip_wrappers(state: StateDict) -> StateDict:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _classifier_prefix(prefix: str) -> bool:
    return re.sub(r"(\.\d+)+$", "", prefix) in CLASSIFIER_NAMES


def _map_classifier(state: StateDict, own: StateDict, head: str, fit: WeightsFit) -> StateDict:
    """Rename a classifier stored under another name onto `head` (the model's), when that is the
    only difference between the names."""
    head_keys = {k for k in own if k.startswith(head + ".")}
    missing = {k for k in set(own) - set(state) if not k.endswith(OPTIONAL_SUFFIX)}
    unexpected = set(state) - set(own)
    if not missing or not missing <= head_keys or not unexpected:
        return state
    prefixes = {k.rsplit(".", 1)[0] for k in unexpected}
    if len(prefixes) != 1:
        return state
    (prefix,) = prefixes
    suffixes = {k[len(prefix) + 1:] for k in unexpected}
    if not _classifier_prefix(prefix) or suffixes != {k[len(head) + 1:] for k in missing}:
        return state
    fit.renamed[prefix] = head
    fit.notes.append(f"classifier '{prefix}' in the file loaded as the model's '{head}'")
    return {(head + k[len(prefix):] if k in unexpected else k): v for k, v in state.items()}


def fit_state_dict(model: nn.Module, state: StateDict, where: str = "the state dict") -> WeightsFit:
    """Load `state` into `model` (see the module docstring for what is mapped); raise WeightsError
    naming the keys that do not match."""
    own = model.state_dict()
    names = {m: n for n, m in model.named_modules()}
    head = names[classifier_module(model)]
    fit = WeightsFit(loaded=0)
    state = _map_classifier(_strip_wrappers(dict(state)), own, head, fit)

    head_keys = [k for k in own if k.startswith(head + ".")]
    head_shapes = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in head_keys if k in state}
    if any(a != b for a, b in head_shapes.values()):
        weight = head_shapes.get(head + ".weight")
        if weight is None or weight[0][1:] != weight[1][1:]:
            raise WeightsError(f"{where}: the classifier '{head}' has shape {weight[0] if weight else '?'} in the file, "
                               f"{weight[1] if weight else '?'} in the model (its inputs differ: another network?)")
        state = {k: v for k, v in state.items() if k not in head_keys}
        fit.untrained.append(head)
        fit.notes.append(f"the file's classifier has {weight[0][0]} classes, the model {weight[1][0]}: "
                         f"everything else is loaded, the classifier '{head}' starts untrained")

    missing = sorted(k for k in set(own) - set(state) if k not in head_keys or head not in fit.untrained)
    missing = [k for k in missing if not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_shown(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_shown(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"other shapes: {_shown(wrong)} (e.g. '{k}' is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
        shared = len(set(state) & set(own))
        if shared < len(own) / 2:
            parts.append(f"only {shared} of the model's {len(own)} tensors are named in the file: another architecture's weights?")
        raise WeightsError(f"{where} does not fit the model: {'; '.join(parts)}")

    merged = dict(own)
    merged.update(state)
    load_tensors(model, merged)
    fit.loaded = len(state)
    return fit


def load_weights(model: nn.Module, path: str | Path) -> WeightsFit:
    """Read `path` and fit it into `model`."""
    return fit_state_dict(model, read_state_dict(path), f"weights file '{path}'")
