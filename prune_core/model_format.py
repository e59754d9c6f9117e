"""A model is a directory: `model.json` (architecture, channel plan, classes, lineage) + `weights.safetensors`.

The architecture is a built-in name, `timm:<model>` or a user's `<module>:<factory>` with its
keyword arguments (`arch_kwargs`); how images become its input is `input_size` (the square the
model sees) plus an optional `resize_size` and `interpolation` (`ModelCard.preprocess`).

Loading builds the architecture fresh, shrinks every pruned layer to the channel plan, and loads
the weights with safetensors (no unpickling). Anything that does not fit raises ModelFormatError
naming the file and the problem.
"""
from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import build_model, check_arch_name
from .data import Interpolation, Preprocess
from .hashing import file_sha256
from .measure import count_macs, count_params

if TYPE_CHECKING:
    from .label_shift import Calibration

FORMAT = "edgetune-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Module attributes that describe a layer's channel structure (what pruning changes).
STRUCTURE_ATTRS = (
    "in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
    "normalized_shape", "num_channels", "num_groups", "num_parameters",
)
STRUCTURED_TYPES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


class ModelFormatError(ValueError):
    """A model directory that cannot be read; the message names the file and the problem."""


@dataclass
class Lineage:
    """Where a model came from: its parent version and the cycle that made it."""

    parent: str | None = None
    criterion: str | None = None
    level: float | None = None
    allocation: str | None = None
    finetune_before: int | None = None
    retrain_scope: str | None = None  # which parameters retraining updated (prune_core.options.RetrainScope)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelCard:
    """Everything in model.json."""

    arch: str
    num_classes: int
    class_names: list[str]
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None  # shorter side scaled to this, then centre-cropped to input_size; None: whole image scaled
    interpolation: Interpolation = Interpolation.BILINEAR
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a timm model or a factory
    channel_plan: dict[str, dict[str, Any]] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    params: int = 0
    macs: int = 0
    weights_sha256: str = ""
    # Label-shift correction: calibrated probabilities are softmax(logits / temperature + logit_bias),
    # and class_prior is the class distribution they assume (what the model was trained for).
    temperature: float = 1.0
    logit_bias: list[float] = field(default_factory=list)  # empty: no per-class bias
    class_prior: list[float] = field(default_factory=list)  # empty: uniform
    confusion: list[list[float]] = field(default_factory=list)  # [predicted][true] counts on labelled held-out data (BBSE)

    def prior(self) -> list[float]:
        """The class prior the model's calibrated probabilities assume (uniform when none is recorded)."""
        return list(self.class_prior) or [1.0 / self.num_classes] * self.num_classes

    def bias(self) -> list[float]:
        return list(self.logit_bias) or [0.0] * self.num_classes

    def calibration(self) -> "Calibration":
        from .label_shift import Calibration

        return Calibration(self.temperature, tuple(self.logit_bias) if self.logit_bias else None)

    @property
    def preprocess(self) -> Preprocess:
        """How an image becomes this model's input, for every caller that decodes one."""
        return Preprocess(self.input_size, self.resize_size, self.interpolation)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["mean"], body["std"] = list(self.mean), list(self.std)
        body["interpolation"] = Interpolation(self.interpolation).value
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_json(cls, data: Any, where: str = MODEL_JSON) -> "ModelCard":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelFormatError(f"{where}: not an edgetune model description (missing \"format\": \"{FORMAT}\")")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(f"{where}: unsupported format_version {data.get('format_version')!r} (this edgetune reads {FORMAT_VERSION})")
        try:
            card = cls(
                arch=str(data["arch"]),
                num_classes=int(data["num_classes"]),
                class_names=[str(c) for c in data["class_names"]],
                input_size=int(data["input_size"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                resize_size=None if data.get("resize_size") is None else int(data["resize_size"]),
                interpolation=Interpolation(data.get("interpolation", Interpolation.BILINEAR.value)),
                arch_kwargs=dict(data.get("arch_kwargs", {})),
                channel_plan={str(k): dict(v) for k, v in data.get("channel_plan", {}).items()},
                lineage=Lineage(**data.get("lineage", {})),
                params=int(data.get("params", 0)),
                macs=int(data.get("macs", 0)),
                weights_sha256=str(data.get("weights_sha256", "")),
                temperature=float(data.get("temperature", 1.0)),
                logit_bias=[float(v) for v in data.get("logit_bias", [])],
                class_prior=[float(v) for v in data.get("class_prior", [])],
                confusion=[[float(v) for v in row] for row in data.get("confusion", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"{where}: missing or invalid field ({type(exc).__name__}: {exc})") from None
        try:
            check_arch_name(card.arch)
            card.preprocess  # noqa: B018 -- validates resize_size against input_size
        except ValueError as exc:
            raise ModelFormatError(f"{where}: {exc}") from None
        if len(card.class_names) != card.num_classes:
            raise ModelFormatError(f"{where}: {len(card.class_names)} class names for {card.num_classes} classes")
        if len(card.mean) != 3 or len(card.std) != 3 or any(s <= 0 for s in card.std):
            raise ModelFormatError(f"{where}: mean and std need 3 values each, std positive")
        if not card.temperature > 0:
            raise ModelFormatError(f"{where}: temperature must be positive")
        for name in ("logit_bias", "class_prior"):
            values = getattr(card, name)
            if values and len(values) != card.num_classes:
                raise ModelFormatError(f"{where}: {name} has {len(values)} values for {card.num_classes} classes")
        if card.confusion and (len(card.confusion) != card.num_classes or any(len(r) != card.num_classes for r in card.confusion)):
            raise ModelFormatError(f"{where}: confusion must be {card.num_classes}x{card.num_classes}")
        if card.class_prior and (min(card.class_prior) < 0 or sum(card.class_prior) <= 0):
            raise ModelFormatError(f"{where}: class_prior must be non-negative with a positive sum")
        return card


def channel_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The structural attributes of every conv/norm/linear layer, keyed by module name."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, STRUCTURED_TYPES):
            attrs = {a: getattr(module, a) for a in STRUCTURE_ATTRS if hasattr(module, a)}
            plan[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    return plan


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory: write, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def read_card(directory: str | Path) -> ModelCard:
    """Parse and validate `directory/model.json` without touching the weights."""
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise ModelFormatError(f"{path}: not found (is '{directory}' a model directory?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    return ModelCard.from_json(data, str(path))


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
    # Module versions (e.g. MNASNet's) live in state_dict metadata, which safetensors does not keep;
    # the freshly built model's metadata describes the same code.
    state = collections.OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFormatError(f"{weights}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), card
