"""The generalist watch: a background thread runs the generalist (the device's first model) on a
sample of the served images, and when a class the served specialist was not trained for appears in
its class-prior estimate, it asks for the generalist to be served again (a swap, not a cycle).

Requests only hand it images (a bounded queue: a full queue drops the image, never the request);
the generalist is loaded on first use and only while a specialist is being served: through its
built engine where the serving backend is not torch (no torch in the serving process), else, or
where no engine of it loads, through its torch model.
"""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from prune_core.card import ModelCard, read_card

from ..engines import Backend, EngineUnavailable, ServingBackend, load_engine
from ..engines.select import AUTO_ORDER
from .drift import Appeared, DriftSettings, DriftWatch

log = logging.getLogger("edgetune.generalist")

# A model's forward pass: uint8 images N×3×S×S in, float32 logits N×K out (an Engine's `logits`).
Logits = Callable[[np.ndarray], np.ndarray]


def engine_backends(serving_backend: ServingBackend | str) -> tuple[Backend, ...]:
    """The built engines worth trying for the generalist under `serving_backend`, best first
    (none for torch: the generalist then runs as the served model does)."""
    setting = ServingBackend(serving_backend)
    if setting is ServingBackend.TORCH:
        return ()
    return AUTO_ORDER if setting is ServingBackend.AUTO else (Backend(setting.value),)


def load_logits(directory: Path, serving_backend: ServingBackend | str = ServingBackend.TORCH, device: Any = "cpu") -> Logits:
    """The generalist's forward pass: its built engine of the serving backend where one loads here
    (daemon.engines.load_engine: never built here), else its torch model (imported only then)."""
    for backend in engine_backends(serving_backend):
        try:
            return load_engine(directory, backend).logits
        except EngineUnavailable as exc:
            log.info("generalist: no %s engine (%s)", backend.value, exc.reason)
    log.info("generalist: served by torch")
    return torch_logits(directory, device)


def torch_logits(directory: Path, device: Any = "cpu") -> Logits:
    """The generalist's torch model as a forward pass (imports torch)."""
    import torch

    from prune_core.model_format import load_model

    from ..engines.base import InputSpec
    from ..engines.eager import TorchEngine  # imports torch

    device = torch.device(device)
    model, card = load_model(directory, device)
    return TorchEngine(model, InputSpec.of(card), device).logits


class GeneralistWatch:
    def __init__(self, version: str, directory: Path, settings: DriftSettings, on_appeared: Callable[[Appeared], None],
                 logits: Callable[[], Logits] | None = None):
        """`logits` makes the generalist's forward pass, called on first use (default: `load_logits`
        under the torch backend on the CPU)."""
        self.version = version
        self.directory = directory
        self.s = settings
        self.on_appeared = on_appeared
        self._make_logits = logits or (lambda: load_logits(directory))
        self._queue: "queue.Queue[tuple[np.ndarray, ModelCard] | None]" = queue.Queue(maxsize=64)
        self._offered = 0
        self._logits: Logits | None = None
        self.watch: DriftWatch | None = None
        self._thread: threading.Thread | None = None

    def offer(self, served_version: str, served_card: ModelCard, image: Any) -> None:
        """A served image (uint8 3×S×S, array or tensor); every `sample_every`th one of a specialist
        reaches the generalist."""
        if not self.s.enabled or served_version == self.version or served_card.prior() == [1.0 / served_card.num_classes] * served_card.num_classes:
            return  # the generalist itself, or a model not specialised to a prior, needs no watch
        self._offered += 1
        if self._offered % self.s.sample_every:
            return
        try:
            self._queue.put_nowait((image, served_card))
        except queue.Full:
            pass

    def start(self) -> None:
        if self.s.enabled:
            self._thread = threading.Thread(target=self._run, name="generalist-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def reset(self) -> None:
        """Forget the estimate (after a swap: the traffic it summarised was judged against another model)."""
        if self.watch is not None:
            self.watch.reset()

    def _load(self) -> None:
        self._logits = self._make_logits()
        self.watch = DriftWatch(read_card(self.directory), self.s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            image, served_card = item
            try:
                if self._logits is None:
                    self._load()
                self.watch.observe(self._logits(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[None])))
                appeared = self.watch.appeared(served_card)
                if appeared is not None:
                    self.on_appeared(appeared)
                    self.watch.reset()
            except Exception:  # the watch must never take serving down
                log.exception("generalist watch failed on a sample")
