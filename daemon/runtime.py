"""Wiring: everything the API needs, built from Settings, started and stopped together."""
from __future__ import annotations

import logging
from pathlib import Path

from prune_core import pick_device
from prune_core.model_format import ModelFormatError

from .buffer import SampleBuffer
from .config import Settings
from .gate import Gate
from .metrics import Metrics
from .model_store import ModelStore
from .scheduler import Scheduler
from .serving import ModelHolder, load_served
from .telemetry import make_provider

log = logging.getLogger("edgetune")


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


class Runtime:
    def __init__(self, settings: Settings, import_model: Path | None = None):
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(settings.device)
        self.metrics = Metrics()
        self.store = ModelStore(settings.models_dir, settings.keep_versions)
        self.store.remove_stale(protect=set(self.store.versions()))
        if not self.store.versions():
            if import_model is None:
                raise StartupError(f"no model in {settings.models_dir}: start once with --model DIR to import one")
            try:
                version = self.store.import_model(import_model)
            except (ModelFormatError, OSError) as exc:
                raise StartupError(f"cannot import --model {import_model}: {exc}") from None
            self.store.set_active(version)
        self.holder = ModelHolder()
        self._load_first_model()
        self.buffer = SampleBuffer(settings.buffer_path, settings.buffer_max_rows, settings.buffer_max_bytes, settings.holdout_fraction)
        self.provider = make_provider(settings.telemetry, settings.simulated_telemetry)
        self.gate = Gate(settings)
        self.scheduler = Scheduler(settings, self.buffer, self.store, self.holder, self.gate, self.provider, self.metrics, self.device)

    def _load_first_model(self) -> None:
        """The active version, or, if it will not load, the newest version that does."""
        active = self.store.active()
        candidates = ([active] if active else []) + self.store.last_good(exclude={active} if active else set())
        for version in candidates:
            try:
                served = load_served(version, self.store.path(version), self.device)
            except (ModelFormatError, OSError, RuntimeError) as exc:
                log.error("model %s does not load: %s", version, exc)
                continue
            if version != active:
                log.warning("falling back to model %s (active was %s)", version, active)
                try:
                    self.store.set_active(version)
                except OSError as exc:  # a read-only state dir: serve it anyway, the pointer stays
                    log.warning("could not move the active pointer to %s: %s", version, exc)
            self.holder.swap(served)
            self.metrics.set_model(served.version, served.card.arch, served.params, served.macs)
            return
        raise StartupError(f"no loadable model version in {self.store.dir}")

    def start(self) -> None:
        self.buffer.start()
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.buffer.close()
        self.provider.close()
