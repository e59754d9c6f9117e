"""The served model and its hot-swap.

A `Served` bundle is immutable; the holder's reference to it is replaced in one assignment after
the new model is loaded and warmed up, so a request keeps the bundle it started with and no
request waits for loading.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prune_core.measure import count_macs, count_params
from prune_core.model_format import ModelCard, load_model

from .prior_adapter import PriorAdapter, PriorSettings


@dataclass(frozen=True)
class Answer:
    """One image's answer: the top-k served (prior-corrected where that is on) and the uncorrected
    calibrated argmax (what the spot check compares against)."""

    top: list[tuple[int, float]]
    raw_pred: int


@dataclass(frozen=True)
class Served:
    version: str
    model: nn.Module
    card: ModelCard
    params: int
    macs: int
    device: torch.device

    scale: tuple[torch.Tensor, torch.Tensor]  # mean and std ×255, on the device: built once, not per request
    prior: PriorAdapter  # calibration and the traffic's class prior, per served model

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's raw logits for a uint8 batch N×3×S×S (on the CPU)."""
        mean, std = self.scale
        x = (images.to(self.device).float() - mean) / std
        return self.model(x).float().cpu()

    def predict(self, images: torch.Tensor, top_k: int = 5, track: bool = True) -> list[Answer]:
        """Answers for a uint8 batch N×3×S×S. With `track` the answers are traffic: they feed the
        class-prior estimate (warm-up passes do not)."""
        logits = self.logits(images).numpy()  # the prior adapter is numpy (no torch when serving)
        if track:
            probs, raw = self.prior.answer(logits)
        else:
            probs = raw = self.prior.calibration.apply(logits)
        probs, raw = torch.from_numpy(probs), torch.from_numpy(raw)
        scores, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
        raw_pred = raw.argmax(1).tolist()
        return [Answer(list(zip(i.tolist(), p.tolist())), r) for i, p, r in zip(idx, scores, raw_pred)]


def load_served(version: str, directory: Path, device: torch.device, prior: PriorSettings = PriorSettings()) -> Served:
    """Load a model directory and warm it up (first forward passes allocate and tune kernels)."""
    model, card = load_model(directory, device)
    scale = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (card.mean, card.std))
    served = Served(version, model, card, count_params(model), count_macs(model, card.input_size), device, scale,
                    PriorAdapter(card, prior))
    warm = torch.zeros(1, 3, card.input_size, card.input_size, dtype=torch.uint8)
    for _ in range(2):
        served.predict(warm, track=False)
    return served


class ModelHolder:
    """Holds the current `Served`; `swap` replaces it atomically and returns the previous one."""

    def __init__(self) -> None:
        self._current: Served | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Served | None:
        return self._current

    def swap(self, served: Served) -> Served | None:
        with self._lock:
            previous, self._current = self._current, served
        return previous
