"""The served model and its hot-swap.

A `Served` bundle is immutable; the holder's reference to it is replaced in one assignment after
the new model's engine is loaded and warmed up, so a request keeps the bundle it started with and
no request waits for loading. The engine is the one `serving_backend` selects (daemon/engines):
a verified onnxruntime or TensorRT engine built for the version, else the torch model itself.
Engines are never built here: a missing one is reported in `Served.selection.rebuild`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engines import Backend, Engine, InputSpec, Selection, ServingBackend, select_engine
from ..engines.base import top_classes
from ..engines.select import median_latency_ms
from .prior_adapter import ModelPrior, PriorAdapter

if TYPE_CHECKING:
    from prune_core.card import ModelCard


@dataclass(frozen=True)
class Answer:
    """One image's answer: the top-k served (prior-corrected where that is on), the uncorrected
    calibrated argmax and the argmax under the prior estimate in force (None without one: the spot check
    compares both, whichever was served), and the image's likelihood row (float32 K, kept in the buffer
    so the prior estimate is rebuilt at start; None for untracked passes)."""

    top: list[tuple[int, float]]
    raw_pred: int
    corrected_pred: int | None = None
    row: np.ndarray | None = None


@dataclass(frozen=True)
class Served:
    version: str
    engine: Engine  # uint8 images in, float32 logits out
    card: ModelCard
    params: int
    macs: int
    prior: PriorAdapter  # the device's class prior estimate, shared by every served model
    assumes: ModelPrior  # this model's calibration and class prior
    selection: Selection  # how the engine was chosen: the other backends' reasons, engines to rebuild
    latency_ms: float  # the engine's median batch-1 forward, measured when it was loaded

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    @property
    def device(self) -> str:
        return self.engine.device

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The model's raw float32 logits (N×K) for a uint8 batch N×3×S×S."""
        return self.engine.logits(np.asarray(images))

    def predict(self, images: np.ndarray, top_k: int = 5, track: bool = True) -> list[Answer]:
        """Answers for a uint8 batch N×3×S×S (numpy). With `track` the answers are traffic: they
        feed the class-prior estimate (warm-up passes do not)."""
        logits = self.logits(images)
        if not track:
            raw = self.assumes.calibration.apply(logits)
            return [Answer(top, int(r)) for top, r in zip(top_classes(raw, top_k), raw.argmax(1))]
        a = self.prior.answer(self.assumes, logits)  # calibration and prior correction, the same for every backend
        corrected = [None] * len(logits) if a.corrected_pred is None else a.corrected_pred.tolist()
        return [Answer(top, int(r), c, row) for top, r, c, row in zip(top_classes(a.served, top_k), a.raw.argmax(1), corrected, a.rows)]


def torch_engine(directory: Path, device: Any, spec: InputSpec) -> Engine:
    """The version's torch model as an engine (imports torch: only when torch serves or is timed)."""
    import torch

    from prune_core.model_format import load_model

    from ..engines.eager import TorchEngine

    device = torch.device(device)
    model, _ = load_model(directory, device)
    return TorchEngine(model, spec, device)


def check_weights(directory: Path, card: ModelCard) -> None:
    """Raise ModelFormatError when the version's weights are not the ones its card names. An
    engine serves from its own verified file, but the weights are what the next cycle prunes: a
    version whose weights are damaged must not be served (start-up falls back to another)."""
    from prune_core.hashing import file_sha256
    from prune_core.card import WEIGHTS, ModelFormatError

    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{weights}: not found")
    if card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise ModelFormatError(f"{weights}: checksum does not match model.json (file corrupted or replaced)")


def load_served(version: str, directory: Path, device: Any = "cpu", prior: PriorAdapter | None = None,
                backend: ServingBackend | str = ServingBackend.AUTO, threads: int | None = None) -> Served:
    """Load a version directory under `backend` (the serving_backend setting) and warm it up. `prior`:
    the device's class-prior adapter (the runtime's; a fresh one when None).

    A built engine is loaded only if it still fits this machine (else torch serves and the reason
    is in the selection). `auto` times torch against the engines only when `device` is not the CPU
    (on the CPU a verified engine is the faster, and torch is then not even imported)."""
    from prune_core.card import read_card

    card = read_card(directory)
    spec = InputSpec.of(card)
    setting = ServingBackend(backend)
    timed_torch = None
    if setting is ServingBackend.TORCH or (setting is ServingBackend.AUTO and str(device) != "cpu"):
        timed_torch = torch_engine(directory, device, spec)
    selection = select_engine(setting, directory, timed_torch, threads)
    engine = selection.engine or torch_engine(directory, device, spec)  # torch checks the weights as it loads them
    if engine.backend is not Backend.TORCH:
        check_weights(directory, card)
    engine.warm_up()  # first forward passes allocate and tune kernels (loaded engines are warm already)
    latency = selection.latency_ms.get(engine.backend)
    if latency is None:
        latency = median_latency_ms(engine)
    return Served(version, engine, card, card.params, card.macs, prior if prior is not None else PriorAdapter(),
                  ModelPrior.of(version, card), selection, latency)


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
