"""Which engine serves a version: the `serving_backend` setting, resolved at load time.

`auto` loads every built engine that fits this machine, times a few batch-1 forward passes of
each (and of torch, when the caller passes a torch engine) and serves the fastest. An explicit
backend that cannot load falls back to torch with the reason. numpy only: torch is compared only
if the caller already holds it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .base import Backend, Engine, EngineUnavailable
from .load import load_engine

MEASURE_RUNS = 10
AUTO_ORDER = (Backend.TENSORRT, Backend.ONNXRUNTIME)


class ServingBackend(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class Selection:
    """The engine to serve (None: the caller's torch model) and how it was chosen."""

    backend: Backend
    engine: Optional[Engine]
    latency_ms: Dict[Backend, float] = field(default_factory=dict)  # median batch-1 forward, when measured
    skipped: Dict[Backend, str] = field(default_factory=dict)  # why each other backend is not serving
    rebuild: Tuple[Backend, ...] = ()  # backends whose engine is missing or stale: build them in the background


def backends_to_build(setting: ServingBackend) -> Tuple[Backend, ...]:
    """The engines worth building for a version under `setting` (none for torch)."""
    setting = ServingBackend(setting)
    if setting is ServingBackend.TORCH:
        return ()
    return AUTO_ORDER if setting is ServingBackend.AUTO else (Backend(setting.value),)


def median_latency_ms(engine: Engine, runs: int = MEASURE_RUNS) -> float:
    """Median wall time of `runs` batch-1 `logits` calls (the engine is already warm)."""
    batch = engine.spec.zeros(1)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.logits(batch)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def select_engine(
    setting: ServingBackend,
    version_dir: Path,
    torch_engine: Optional[Engine] = None,
    threads: Optional[int] = None,
    measure: Callable[[Engine], float] = median_latency_ms,
) -> Selection:
    """Resolve `setting` for the version in `version_dir`.

    `torch_engine`: the version's torch model as an Engine (eager.TorchEngine), if the caller has
    it loaded; `auto` then times it too (e.g. torch on a GPU against onnxruntime on the CPU).
    Without it, torch is only the fallback (Selection.engine None)."""
    setting = ServingBackend(setting)
    wanted = backends_to_build(setting)
    if not wanted:
        return Selection(Backend.TORCH, torch_engine, {}, _not_tried(setting, Backend.TORCH, {}))
    loaded: List[Engine] = []
    skipped: Dict[Backend, str] = {}
    rebuild: List[Backend] = []
    for backend in wanted:
        try:
            loaded.append(load_engine(version_dir, backend, threads))
        except EngineUnavailable as exc:
            skipped[backend] = str(exc)
            if exc.rebuild:
                rebuild.append(backend)
    if torch_engine is not None and setting is ServingBackend.AUTO:
        loaded.append(torch_engine)
    if not loaded:
        return Selection(Backend.TORCH, torch_engine, {}, _not_tried(setting, Backend.TORCH, skipped), tuple(rebuild))
    if len(loaded) == 1:
        chosen, latency = loaded[0], {}
    else:
        latency = {engine.backend: measure(engine) for engine in loaded}
        chosen = min(loaded, key=lambda engine: latency[engine.backend])
    for engine in loaded:
        if engine is not chosen:
            skipped[engine.backend] = f"slower: {latency[engine.backend]:.3g} ms against {latency[chosen.backend]:.3g} ms for {chosen.name}"
    return Selection(chosen.backend, chosen, latency, _not_tried(setting, chosen.backend, skipped), tuple(rebuild))


def _not_tried(setting: ServingBackend, chosen: Backend, skipped: Dict[Backend, str]) -> Dict[Backend, str]:
    """`skipped`, completed with a reason for every other backend that was not even tried."""
    out = dict(skipped)
    for backend in Backend:
        if backend is chosen or backend in out:
            continue
        if backend is Backend.TORCH:
            out[backend] = "not timed: a verified engine serves, torch is the fallback" if setting is ServingBackend.AUTO \
                else f"serving_backend = {setting.value} (torch is the fallback)"
        else:
            out[backend] = f"serving_backend = {setting.value}"
    return out
