"""A model is a directory: `model.json` (architecture, channel plan, classes, lineage) + `weights.safetensors`.

The architecture is a built-in name, `timm:<model>` or a user's `<module>:<factory>` with its
keyword arguments (`arch_kwargs`); how images become its input is `input_size` (the square the
model sees) plus an optional `resize_size` and `interpolation` (`ModelCard.preprocess`).

Loading builds the architecture fresh, shrinks every pruned layer to the channel plan, and loads
the weights with safetensors (no unpickling). Anything that does not fit raises ModelFormatError
naming the file and the problem.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import build_model
from .atomic import atomic_write, fsync_dir  # noqa: F401 (re-exported)
from .card import (  # noqa: F401 (re-exported: the card reads without torch, see card)
    FORMAT, FORMAT_VERSION, IMAGENET_MEAN, IMAGENET_STD, MODEL_JSON, WEIGHTS, Lineage, ModelCard, ModelFormatError,
    read_card,
)
from .hashing import file_sha256
from .measure import count_macs, count_params
from .state_dict import load_tensors

# Module attributes that describe a layer's channel structure (what pruning changes).
STRUCTURE_ATTRS = (
    "in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
    "normalized_shape", "num_channels", "num_groups", "num_parameters",
)
STRUCTURED_TYPES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def channel_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The structural attributes of every conv/norm/linear layer, keyed by module name."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, STRUCTURED_TYPES):
            attrs = {a: getattr(module, a) for a in STRUCTURE_ATTRS if hasattr(module, a)}
            plan[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    return plan


def save_model(model: nn.Module, card: ModelCard, directory: str | Path) -> ModelCard:
    """Write `model` with `card` (plan, params, MACs and checksum filled in) into `directory`.

    Each file is replaced atomically, weights before model.json, so a reader sees either the old
    model or the new one; a crash in between is caught by the checksum on load.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card.channel_plan = channel_plan(model)
    card.params = count_params(model)
    card.macs = count_macs(model, card.input_size)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    card.weights_sha256 = file_sha256(directory / WEIGHTS)
    atomic_write(directory / MODEL_JSON, lambda tmp: Path(tmp).write_text(json.dumps(card.to_json(), indent=2) + "\n"))
    return card


def _set_tensor(model: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    current = getattr(owner, attr)
    if tuple(current.shape) == shape:
        return
    empty = torch.empty(shape, dtype=current.dtype)
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(empty, requires_grad=current.requires_grad))
    else:
        owner._buffers[attr] = empty


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return {"weight": (module.out_channels, module.in_channels // module.groups, *module.kernel_size), "bias": (module.out_channels,)}
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        n = (module.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    return {}


def apply_channel_plan(model: nn.Module, plan: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Shrink a freshly built model to `plan` and the tensor `shapes` found in the weights file."""
    modules = dict(model.named_modules())
    for name, attrs in plan.items():
        module = modules.get(name)
        if module is None:
            raise ModelFormatError(f"{where}: channel plan names layer '{name}', which {type(model).__name__} does not have")
        for attr, value in attrs.items():
            if attr not in STRUCTURE_ATTRS or not hasattr(module, attr):
                raise ModelFormatError(f"{where}: channel plan sets '{attr}' on layer '{name}', which has no such attribute")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    own = dict(model.state_dict())
    missing = sorted(set(own) - set(shapes))
    extra = sorted(set(shapes) - set(own))
    if missing or extra:
        raise ModelFormatError(
            f"{where}: weights do not match the architecture "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'…' if len(extra) > 3 else ''})"
        )
    for name, shape in shapes.items():
        _set_tensor(model, name, shape)
    for name, module in modules.items():
        for tensor_name, expected in _expected_shapes(module).items():
            tensor = getattr(module, tensor_name, None)
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ModelFormatError(
                    f"{where}: tensor '{name}.{tensor_name}' has shape {tuple(tensor.shape)} but the channel plan implies {expected}"
                )


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the exact (possibly pruned) model of a model directory, in eval mode on `device`."""
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{weights}: not found")
    if card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise ModelFormatError(f"{weights}: checksum does not match model.json (file corrupted or replaced)")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{weights}: unreadable safetensors file ({exc})") from None
    try:
        model = build_model(card.arch, card.num_classes, card.arch_kwargs)
    except ValueError as exc:
        raise ModelFormatError(f"{directory / MODEL_JSON}: {exc}") from None
    apply_channel_plan(model, card.channel_plan, shapes, str(directory / MODEL_JSON))
    try:
        load_tensors(model, state)  # with the module versions safetensors does not keep
    except RuntimeError as exc:
        raise ModelFormatError(f"{weights}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), card
