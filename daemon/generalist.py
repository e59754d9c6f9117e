"""The generalist watch: a background thread runs the generalist (the device's first model) on a
sample of the served images, and when a class the served specialist was not trained for appears in
its class-prior estimate, it asks for the generalist to be served again (a swap, not a cycle).

Requests only hand it images (a bounded queue: a full queue drops the image, never the request);
the generalist is loaded on first use and only while a specialist is being served.
"""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable

import torch

from prune_core.model_format import ModelCard, load_model

from .drift import Appeared, DriftSettings, DriftWatch

log = logging.getLogger("edgetune.generalist")


class GeneralistWatch:
    def __init__(self, version: str, directory: Path, device: torch.device, settings: DriftSettings,
                 on_appeared: Callable[[Appeared], None]):
        self.version = version
        self.directory = directory
        self.device = device
        self.s = settings
        self.on_appeared = on_appeared
        self._queue: "queue.Queue[tuple[torch.Tensor, ModelCard] | None]" = queue.Queue(maxsize=64)
        self._offered = 0
        self._model = None
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None
        self.watch: DriftWatch | None = None
        self._thread: threading.Thread | None = None

    def offer(self, served_version: str, served_card: ModelCard, image: torch.Tensor) -> None:
        """A served image (uint8 3×S×S); every `sample_every`th one of a specialist reaches the generalist."""
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
        model, card = load_model(self.directory, self.device)
        self._model = model.eval()
        self._scale = tuple(torch.tensor(v, device=self.device).view(1, 3, 1, 1) * 255 for v in (card.mean, card.std))
        self.watch = DriftWatch(card, self.s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            image, served_card = item
            try:
                if self._model is None:
                    self._load()
                mean, std = self._scale
                with torch.inference_mode():
                    logits = self._model((image.unsqueeze(0).to(self.device).float() - mean) / std).float().cpu()
                self.watch.observe(logits)
                appeared = self.watch.appeared(served_card)
                if appeared is not None:
                    self.on_appeared(appeared)
                    self.watch.reset()
            except Exception:  # the watch must never take serving down
                log.exception("generalist watch failed on a sample")
