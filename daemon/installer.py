"""The one way a model version becomes the served one: load it, warm it up, swap it in, move the
active pointer, update the metrics. Used by an accepted cycle, `/models/{v}/activate`, the
start-up fallback and crash recovery."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from .metrics import Metrics
from .model_store import ModelStore
from .prior_adapter import PriorSettings
from .serving import ModelHolder, Served, load_served

log = logging.getLogger("edgetune.installer")


class Installer:
    def __init__(self, store: ModelStore, holder: ModelHolder, metrics: Metrics, device, prior: PriorSettings = PriorSettings()):
        self.prior = prior
        self.store = store
        self.holder = holder
        self.metrics = metrics
        self.device = device
        self._lock = threading.Lock()  # one install at a time

    def install(self, version: str, *, pointer_optional: bool = False) -> Served:
        """Serve `version` and make it the active one. Raises (and changes nothing) when it does
        not load, or when the pointer cannot be moved unless `pointer_optional` (start-up on a
        read-only state dir: serve it anyway and log)."""
        with self._lock:
            served = load_served(version, self.store.path(version), self.device, self.prior)  # loads and warms up
            previous = self.holder.swap(served)
            if self.store.active() != version:
                try:
                    self.store.set_active(version)
                except OSError as exc:
                    if not pointer_optional:
                        if previous is not None:
                            self.holder.swap(previous)
                        raise
                    log.warning("could not move the active pointer to %s: %s", version, exc)
            if previous is not None:  # the first model loaded is not a swap
                self.metrics.swaps.inc()
            self.metrics.set_model(served.version, served.card.arch, served.params, served.macs)
            return served

    def install_candidate(self, staging: Path, version: str) -> Served:
        """Give an accepted candidate its version name and install it; a candidate that does not
        install is removed again. Older versions beyond `keep_versions` are then deleted."""
        previous = self.holder.current
        self.store.commit(staging, version)
        try:
            served = self.install(version)
        except Exception:
            self.discard(version)
            raise
        self.store.remove_stale(protect={version, previous.version if previous else ""})
        return served

    def discard(self, version: str) -> None:
        """Remove a committed but never accepted version (unless it is the active one)."""
        try:
            if self.store.active() != version:
                self.store.remove(version)
        except OSError as exc:
            log.warning("could not remove unaccepted version %s: %s", version, exc)
