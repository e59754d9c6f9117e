"""Loading a built engine from a version directory, only when it still fits this machine.

An engine is reused when engine.json records it, its file is intact, and the runtime versions
and providers it was built with are the installed ones; anything else raises EngineUnavailable
with the reason (the caller serves torch and rebuilds in the background). numpy only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from . import ort, trt
from .base import Backend, Engine, EngineInfo, EngineUnavailable, Unavailable, file_sha256, read_engines


def available(backend: Backend) -> Tuple[bool, str]:
    """Whether `backend`'s runtime is installed here: (True, what) or (False, why not)."""
    backend = Backend(backend)
    if backend is Backend.TORCH:
        return True, "torch (the reference)"
    return trt.available() if backend is Backend.TENSORRT else ort.available()


def runtime_versions(backend: Backend) -> Dict[str, str]:
    """The installed versions an engine of `backend` depends on (recorded when it is built)."""
    return trt.runtime_versions() if Backend(backend) is Backend.TENSORRT else ort.runtime_versions()


def check_engine(version_dir: Path, backend: Backend) -> EngineInfo:
    """The recorded engine of `backend` in `version_dir` if it can be loaded here, else raises
    EngineUnavailable saying why."""
    backend, version_dir = Backend(backend), Path(version_dir)
    ok, why = available(backend)
    if not ok:
        raise EngineUnavailable(Unavailable.NOT_INSTALLED, why)
    info = read_engines(version_dir).get(backend)
    if info is None:
        raise EngineUnavailable(Unavailable.NOT_BUILT, f"no {backend.value} engine in {version_dir.name}")
    installed = runtime_versions(backend)
    if info.runtime != installed:
        changed = ", ".join(f"{k} {info.runtime.get(k, 'none')} -> {installed.get(k, 'none')}"
                            for k in sorted(set(info.runtime) | set(installed)) if info.runtime.get(k) != installed.get(k))
        raise EngineUnavailable(Unavailable.INCOMPATIBLE, f"{backend.value} engine was built for other runtime versions ({changed})")
    import onnxruntime

    missing = [p for p in info.providers if p not in onnxruntime.get_available_providers()]
    if missing:
        raise EngineUnavailable(Unavailable.INCOMPATIBLE, f"{backend.value} engine ran on {', '.join(missing)}, which this onnxruntime lacks")
    path = version_dir / info.file
    if not path.is_file():
        raise EngineUnavailable(Unavailable.CORRUPT, f"{path}: missing")
    if file_sha256(path) != info.file_sha256:
        raise EngineUnavailable(Unavailable.CORRUPT, f"{path}: checksum does not match engine.json (altered or replaced)")
    if backend is Backend.TENSORRT and not any((version_dir / trt.CACHE_DIR).glob("*.engine")):
        raise EngineUnavailable(Unavailable.CORRUPT, f"{version_dir / trt.CACHE_DIR}: no cached TensorRT engine (loading would build one)")
    return info


def load_engine(version_dir: Path, backend: Backend, threads: Optional[int] = None) -> Engine:
    """The cached engine of `backend` in `version_dir`, loaded and warmed up (never built here).

    `threads`: intra-op threads for onnxruntime on the CPU (None: onnxruntime's default)."""
    backend, version_dir = Backend(backend), Path(version_dir)
    if backend is Backend.TORCH:
        raise ValueError("the torch backend is the model itself (prune_core.load_model), not a built engine")
    info = check_engine(version_dir, backend)
    path = version_dir / info.file
    if backend is Backend.TENSORRT:
        engine: Engine = trt.open_engine(path, version_dir, info.input, info.precision, info.max_batch, info)
    else:
        chosen = [(p, o) for p, o in ort.providers() if p in info.providers]
        engine = ort.OrtEngine(path, info.input, chosen, Backend.ONNXRUNTIME, threads, info)
    engine.warm_up()
    return engine
