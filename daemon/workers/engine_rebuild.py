"""Engines rebuilt in the background while torch serves: a version whose engine is missing, stale
(other runtime versions) or corrupt gets it built again, then is swapped in through the installer.

The build runs in a spawned, niced process (like the cycle worker): it needs torch, which a process
serving through onnxruntime never imports, and it must not hold the request path's CPU. It
verifies on the buffer's held-out samples; before any are buffered (a model just imported), on
seeded random images, and says so. Each (version, backend) is tried at most once per daemon run,
so an engine that fails to build is not rebuilt in a loop."""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..engines import Backend, BuildOutcome
from .child_process import start_child

if TYPE_CHECKING:
    from ..ops.metrics import Metrics
    from ..serving.installer import Installer

log = logging.getLogger("edgetune.engines")

RANDOM_IMAGES = 64  # verification images when the buffer holds no held-out sample yet
HELD_OUT = "held-out buffer samples"


@dataclass(frozen=True)
class RebuildJob:
    version: str
    version_dir: str
    backends: tuple[str, ...]
    buffer_path: str
    threads: int | None
    nice: int


@dataclass(frozen=True)
class RebuildResult:
    version: str
    outcomes: list[BuildOutcome]
    verified_on: str  # what the engines were verified on (HELD_OUT, or random images and why)

    def to_dict(self) -> dict:
        return {"version": self.version, "verified_on": self.verified_on, "engines": [o.to_dict() for o in self.outcomes]}


def verification_images(buffer_path: Path, card: Any, limit: int) -> tuple[np.ndarray, str]:
    """Up to `limit` held-out buffer samples decoded for `card` (uint8 N×3×S×S), or seeded random
    images when there are none; and which of the two."""
    from prune_core.imagedecode import decode_array

    from ..storage.buffer import read_snapshot

    images = []
    try:
        rows = read_snapshot(buffer_path, 2**62)
        for _id, image, _label, _pred, holdout in rows:
            if not holdout:
                continue
            try:
                images.append(decode_array(image, card.preprocess))
            except ValueError:
                continue
            if len(images) >= limit:
                rows.close()
                break
    except Exception as exc:  # no buffer yet, or unreadable: verify on random images instead
        log.info("no held-out samples to verify engines on (%s)", exc)
    if images:
        return np.stack(images), f"{len(images)} {HELD_OUT}"
    size = int(card.input_size)
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (RANDOM_IMAGES, 3, size, size), dtype=np.uint8),
            f"{RANDOM_IMAGES} random images (no held-out sample buffered yet)")


def run_rebuild(job: RebuildJob, results) -> None:
    """Process entry point (spawned): build `job.backends` for the version, put a RebuildResult."""
    start_child(job.nice)
    backends = [Backend(b) for b in job.backends]
    try:
        from prune_core.model_format import load_model

        from ..engines.build import VERIFY_IMAGES, build_engines

        model, card = load_model(job.version_dir, "cpu")
        images, verified_on = verification_images(Path(job.buffer_path), card, VERIFY_IMAGES)
        outcomes = build_engines(model, card, job.version_dir, images, backends=backends, threads=job.threads)
    except Exception as exc:  # the model itself does not load: nothing can be built
        verified_on = ""
        outcomes = [BuildOutcome(b, reason=f"rebuild failed: {type(exc).__name__}: {exc}") for b in backends]
    results.put(RebuildResult(job.version, outcomes, verified_on))


@dataclass
class _State:
    pending: deque = field(default_factory=deque)  # (version, backends) to build, oldest first
    building: tuple[str, tuple[str, ...]] | None = None
    last: RebuildResult | None = None
    tried: set = field(default_factory=set)  # (version, backend) built or attempted in this run


class EngineRebuilder:
    """Builds what `request` asks for, one version at a time, on a thread that starts on demand;
    each finished version is handed back to `installer.upgrade`."""

    def __init__(self, installer: Installer, metrics: Metrics, buffer_path: Path, nice: int = 10,
                 threads: int | None = None, context: str = "spawn"):
        self.installer = installer
        self.metrics = metrics
        self.buffer_path = Path(buffer_path)
        self.nice = nice
        self.threads = threads
        self._ctx = mp.get_context(context)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._proc = None
        self._stop = threading.Event()

    def mark_tried(self, version: str, backends: Iterable[Backend]) -> None:
        """`version`'s engines for `backends` were already attempted (by the cycle worker)."""
        with self._lock:
            self._state.tried.update((version, Backend(b)) for b in backends)

    def request(self, version: str, backends: Iterable[Backend]) -> bool:
        """Build `backends` for `version` in the background unless tried already in this run.
        True when something was queued."""
        with self._lock:
            todo = tuple(b.value for b in map(Backend, backends) if (version, b) not in self._state.tried)
            if not todo or self._stop.is_set():
                return False
            self._state.tried.update((version, Backend(b)) for b in todo)
            self._state.pending.append((version, todo))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-rebuild", daemon=True)
                self._thread.start()
        log.info("engines for %s (%s) will be rebuilt in the background; torch serves meanwhile", version, ", ".join(todo))
        return True

    def view(self) -> dict:
        """For /status: what is being built, what is queued and the last result."""
        with self._lock:
            s = self._state
            return {"building": None if s.building is None else {"version": s.building[0], "backends": list(s.building[1])},
                    "queued": [{"version": v, "backends": list(b)} for v, b in s.pending],
                    "last": None if s.last is None else s.last.to_dict()}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or building (True), or `timeout` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._state.pending and self._state.building is None, timeout)

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._state.pending:
                    self._thread = None  # under the lock: the next request starts a new thread
                    self._idle.notify_all()
                    return
                version, backends = self._state.building = self._state.pending.popleft()
            try:
                self._build(version, backends)
            except Exception:  # the rebuilder must never take the daemon down
                log.exception("engine rebuild of %s failed", version)
            finally:
                with self._lock:
                    self._state.building = None
                    self._idle.notify_all()

    def _build(self, version: str, backends: tuple[str, ...]) -> None:
        served = self.installer.holder.current
        if served is None or served.version != version:
            return  # another version is served by now: its own install asked for its engines
        job = RebuildJob(version, str(self.installer.store.path(version)), backends, str(self.buffer_path), self.threads, self.nice)
        results = self._ctx.Queue()
        self._proc = proc = self._ctx.Process(target=run_rebuild, args=(job, results), name=f"engines-{version}", daemon=True)
        proc.start()
        result = None
        while result is None and not self._stop.is_set():
            try:
                result = results.get(timeout=0.2)
            except queue.Empty:
                if not proc.is_alive():
                    try:
                        result = results.get(timeout=0.5)  # the last put may still be in flight
                    except queue.Empty:
                        result = RebuildResult(version, [BuildOutcome(Backend(b), reason=f"the build process exited with code {proc.exitcode}")
                                                         for b in backends], "")
        proc.join(timeout=10)
        self._proc = None
        if result is None:  # stopping
            return
        with self._lock:
            self._state.last = result
        for outcome in result.outcomes:
            self.metrics.engine_builds.labels(backend=outcome.backend.value, outcome="built" if outcome.info else "failed").inc()
            if outcome.info is None:
                log.warning("engine for %s not rebuilt: %s", version, outcome.reason)
        if any(o.info is not None for o in result.outcomes) and not self._stop.is_set():
            served = self.installer.upgrade(version)
            if served is not None:
                log.info("engines for %s rebuilt: now serving through %s", version, served.engine.name)
