"""The one way a model version becomes the served one: load it under the serving backend and warm
it up, swap it in, move the active pointer, update the metrics. Used by an accepted cycle,
`/models/{v}/activate`, the start-up fallback, crash recovery and an engine rebuilt in the
background (`upgrade`). A version whose engine is missing or stale is served by torch and its
engine handed to the rebuilder (never built here: the swap would wait for it)."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Iterable, Protocol

from ..engines import Backend, ServingBackend
from ..ops.metrics import Metrics
from ..storage.model_store import ModelStore
from .prior_adapter import PriorAdapter
from .serving import ModelHolder, Served, load_served

log = logging.getLogger("edgetune.installer")


class Rebuilder(Protocol):
    """What the installer asks of the engine rebuilder (daemon/workers/engine_rebuild.EngineRebuilder, which
    calls back `upgrade`): named by its two calls, so neither module imports the other's class."""

    def request(self, version: str, backends: Iterable[Backend]) -> bool: ...

    def mark_tried(self, version: str, backends: Iterable[Backend]) -> None: ...


class Installer:
    def __init__(self, store: ModelStore, holder: ModelHolder, metrics: Metrics, device: Any, prior: PriorAdapter | None = None,
                 backend: ServingBackend | str = ServingBackend.AUTO, threads: int | None = None):
        self.prior = prior if prior is not None else PriorAdapter()  # the device's, shared by every version served
        self.store = store
        self.holder = holder
        self.metrics = metrics
        self.device = device
        self.backend = ServingBackend(backend)
        self.threads = threads
        self.rebuilder: Rebuilder | None = None  # set by the runtime; without one, nothing is rebuilt
        self._lock = threading.Lock()  # one install at a time

    def install(self, version: str, *, pointer_optional: bool = False) -> Served:
        """Serve `version` and make it the active one. Raises (and changes nothing) when it does
        not load, or when the pointer cannot be moved unless `pointer_optional` (start-up on a
        read-only state dir: serve it anyway and log)."""
        with self._lock:
            return self._install(version, pointer_optional, count_swap=True)

    def upgrade(self, version: str) -> Served | None:
        """Load `version` again, through the same swap, if it is still the one served: its engines
        were rebuilt in the background. Not counted as a model swap. None when another version is
        served by now."""
        with self._lock:
            current = self.holder.current
            if current is None or current.version != version:
                return None
            return self._install(version, pointer_optional=True, count_swap=False)

    def _install(self, version: str, pointer_optional: bool, count_swap: bool) -> Served:
        served = load_served(version, self.store.path(version), self.device, self.prior, self.backend, self.threads)
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
        if previous is not None and count_swap:  # the first model loaded is not a swap
            self.metrics.swaps.inc()
        self.metrics.set_model(served.version, served.card.arch, served.params, served.macs)
        self.metrics.set_backend(served.backend.value, served.engine.name, served.latency_ms)
        log.info("serving %s through %s (%.3g ms at batch 1); %s", version, served.engine.name, served.latency_ms,
                 "; ".join(f"{b.value}: {why}" for b, why in served.selection.skipped.items()))
        if served.selection.rebuild and self.rebuilder is not None:
            self.rebuilder.request(version, served.selection.rebuild)
        return served

    def install_candidate(self, staging: Path, version: str, engines_tried: Iterable[Backend] = ()) -> Served:
        """Give an accepted candidate its version name and install it; a candidate that does not
        install is removed again. Older versions beyond `keep_versions` are then deleted.
        `engines_tried`: the backends the cycle worker already tried to build (not retried in the
        background when they failed)."""
        previous = self.holder.current
        if self.rebuilder is not None:
            self.rebuilder.mark_tried(version, engines_tried)
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
