"""A model's card, `model.json`: architecture, classes, preprocessing, calibration, lineage.

Read and validated without torch (no weights touched), so a serving process whose engine is not
torch can learn everything it needs about a model; `model_format` writes the card with the
weights and rebuilds the torch model from both.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .arch_names import check_arch_name
from .imagedecode import Interpolation, Preprocess
from .label_shift import Calibration

FORMAT = "edgetune-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def calibration(self) -> Calibration:
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


