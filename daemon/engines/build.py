"""Building and verifying an engine for a model version before it is swapped in.

Runs where torch is (the cycle worker, or a background rebuild), never on the request path:
export the model to ONNX, open it under the backend (TensorRT builds its engine here), compare it
with torch on real images, and record it in engine.json only if it passed.

A caller that must be able to pause or stop a build (the cycle worker, told by the daemon) passes
`between`: it is called before each backend and between the steps of each build (after the export,
after opening, between verification batches), and may block (pause) or raise (abort). What it
raises reaches the caller as it is, never turned into a build failure; one step (the export, opening
the engine: a TensorRT build) runs to its end.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

from prune_core.model_format import atomic_write
from prune_core.onnx_export import export_onnx

from . import ort, trt
from .base import (
    ENGINE_JSON, Backend, BuildOutcome, Engine, EngineBuildError, EngineInfo, EngineUnavailable, InputSpec, Precision,
    engines_document, file_sha256, read_engines,
)
from .eager import TorchEngine
from .load import available, runtime_versions
from .verify import TOLERANCES, Tolerance, compare, failure

MAX_BATCH = 16  # the largest batch an engine is built (TensorRT profile) and verified for
BUILT_BACKENDS = (Backend.ONNXRUNTIME, Backend.TENSORRT)
VERIFY_IMAGES = 256  # build_engines verifies on at most this many images (the first ones given)

Between = Callable[[], None]  # called between build steps: may block (pause) or raise (abort)


class _Interrupted(BaseException):
    """Carries what `between` raised past the build's own error handling, which turns every
    Exception into a reason to serve torch."""

    def __init__(self, raised: BaseException):
        super().__init__()
        self.raised = raised


def _guarded(between: Optional[Between]) -> Between:
    """`between` with what it raises wrapped in _Interrupted, so no `except Exception` on the way up takes it."""
    def step() -> None:
        if between is not None:
            try:
                between()
            except Exception as exc:
                raise _Interrupted(exc) from None
    return step


def _unwrapping(run: Callable[[], Any]) -> Any:
    """`run()`, with an interruption raised as what `between` raised."""
    try:
        return run()
    except _Interrupted as stop:
        raise stop.raised from None


def _write_engines(version_dir: Path, update: Callable[[Dict[Backend, EngineInfo]], Any]) -> None:
    """Read engine.json (a corrupt one counts as empty), apply `update` to the dict, write it back atomically."""
    try:
        infos = read_engines(version_dir)
    except EngineUnavailable:
        infos = {}
    update(infos)
    path = version_dir / ENGINE_JSON
    if not infos:
        path.unlink(missing_ok=True)
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(engines_document(infos), indent=2) + "\n"))


def _export(model: nn.Module, input_size: int, version_dir: Path) -> Path:
    """Write model.onnx; an identical file already there is kept, a different one replaced (and
    the engines recorded for the old file forgotten)."""
    path = version_dir / ort.ONNX_FILE
    tmp = version_dir / f".{ort.ONNX_FILE}.{os.getpid()}.tmp"
    try:
        export_onnx(model, input_size, tmp, verify=False)
        new_sha = file_sha256(tmp)
        if path.is_file() and file_sha256(path) == new_sha:
            tmp.unlink()
            return path
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    def forget_old(infos: Dict[Backend, EngineInfo]) -> None:
        for backend in [b for b, info in infos.items() if info.file_sha256 != new_sha]:
            del infos[backend]

    _write_engines(version_dir, forget_old)
    return path


def _open(backend: Backend, path: Path, version_dir: Path, spec: InputSpec, precision: Precision, max_batch: int,
          threads: Optional[int]) -> ort.OrtEngine:
    if backend is Backend.TENSORRT:
        return trt.open_engine(path, version_dir, spec, precision, max_batch)
    return ort.OrtEngine(path, spec, ort.providers(), Backend.ONNXRUNTIME, threads)


def _in_batches(engine: Engine, images: np.ndarray, max_batch: int, step: Between) -> np.ndarray:
    out = []
    for i in range(0, len(images), max_batch):
        step()
        out.append(engine.logits(images[i:i + max_batch]))
    return np.concatenate(out)


def build_engine(
    model: nn.Module,
    card: Any,
    version_dir: Union[str, Path],
    backend: Union[Backend, str],
    verify_images: Union[np.ndarray, torch.Tensor],
    precision: Optional[Precision] = None,
    threads: Optional[int] = None,
    max_batch: int = MAX_BATCH,
    tolerance: Optional[Tolerance] = None,
    between: Optional[Between] = None,
) -> EngineInfo:
    """Build `backend`'s engine for `model` (described by ModelCard `card`) in `version_dir`, verify
    it against torch on `verify_images` (uint8 N×3×S×S, e.g. the held-out buffer samples) and
    record it in engine.json.

    `precision`: FP16 by default for TensorRT (TensorRT keeps FP32 where the GPU has no fast
    FP16), FP32 otherwise. `tolerance`: verify.TOLERANCES[precision] unless given. Raises
    EngineBuildError with the reason when the backend is missing, the build fails or the engine
    answers unlike torch; the version's previous record for `backend` is dropped first, so a
    failed rebuild never leaves a stale engine to load. `between`: see the module's docstring."""
    return _unwrapping(lambda: _build_engine(model, card, version_dir, backend, verify_images, precision, threads,
                                             max_batch, tolerance, _guarded(between)))


def _build_engine(model: nn.Module, card: Any, version_dir: Union[str, Path], backend: Union[Backend, str],
                  verify_images: Union[np.ndarray, torch.Tensor], precision: Optional[Precision], threads: Optional[int],
                  max_batch: int, tolerance: Optional[Tolerance], step: Between) -> EngineInfo:
    backend, version_dir = Backend(backend), Path(version_dir)
    if backend is Backend.TORCH:
        raise ValueError("torch is the reference, not a built engine")
    precision = Precision(precision) if precision else (Precision.FP16 if backend is Backend.TENSORRT else Precision.FP32)
    if precision is Precision.FP16 and backend is not Backend.TENSORRT:
        raise EngineBuildError(f"{backend.value}: FP16 is built only by the tensorrt backend")
    ok, why = available(backend)
    if not ok:
        raise EngineBuildError(f"{backend.value} is not available: {why}")
    images = verify_images.detach().cpu().numpy() if isinstance(verify_images, torch.Tensor) else np.asarray(verify_images)
    if len(images) == 0:
        raise EngineBuildError(f"{backend.value}: no images to verify the engine on")
    spec = InputSpec.of(card)
    _write_engines(version_dir, lambda infos: infos.pop(backend, None))

    start = time.perf_counter()
    reference_model = copy.deepcopy(model).to("cpu").float().eval()
    # Export and build failures come as many exception types (torch.onnx's, onnxruntime's derive
    # from Exception only); each one means "serve torch", with the message as the reason.
    try:
        path = _export(reference_model, spec.input_size, version_dir)
    except Exception as exc:
        raise EngineBuildError(f"{backend.value}: ONNX export failed ({type(exc).__name__}: {str(exc).strip()[:300]})") from None
    step()
    try:
        engine = _open(backend, path, version_dir, spec, precision, max_batch, threads)
        step()
        engine.warm_up()
        got = _in_batches(engine, images, max_batch, step)
    except EngineUnavailable as exc:
        raise EngineBuildError(f"{backend.value}: {exc.reason}") from None
    except Exception as exc:
        raise EngineBuildError(f"{backend.value}: the engine failed to run ({type(exc).__name__}: {str(exc).strip()[:300]})") from None
    reference = _in_batches(TorchEngine(reference_model, spec, torch.device("cpu")), images, max_batch, step)
    verification = compare(reference, got, tolerance or TOLERANCES[precision])
    reason = failure(verification)
    if reason is not None:
        raise EngineBuildError(f"{backend.value} engine failed verification: {reason}")
    info = EngineInfo(
        backend=backend, file=path.name, file_sha256=file_sha256(path), runtime=runtime_versions(backend),
        providers=engine.providers, precision=precision, input=spec, max_batch=max_batch,
        verification=verification, build_seconds=round(time.perf_counter() - start, 3),
    )
    _write_engines(version_dir, lambda infos: infos.__setitem__(backend, info))
    return info


def build_engines(model: nn.Module, card: Any, version_dir: Union[str, Path], verify_images: Union[np.ndarray, torch.Tensor],
                  backends: Iterable[Backend] = BUILT_BACKENDS, between: Optional[Between] = None,
                  precision: Optional[Precision] = None, threads: Optional[int] = None, max_batch: int = MAX_BATCH,
                  tolerance: Optional[Tolerance] = None) -> List[BuildOutcome]:
    """Build every backend in `backends` that is installed here, one after the other, verified on
    the first VERIFY_IMAGES of `verify_images`. Raises only what `between` raises (see the module's
    docstring): an engine is optional (torch serves without one), so a missing runtime, a failed
    build or any other error becomes an outcome with its reason (for the cycle record)."""
    verify_images = verify_images[:VERIFY_IMAGES]
    step = _guarded(between)

    def build_all() -> List[BuildOutcome]:
        outcomes = []
        for backend in backends:
            step()
            backend = Backend(backend)
            ok, why = available(backend)
            if not ok:
                outcomes.append(BuildOutcome(backend, reason=f"not installed: {why}"))
                continue
            try:
                info = _build_engine(model, card, version_dir, backend, verify_images, precision, threads, max_batch,
                                     tolerance, step)
                outcomes.append(BuildOutcome(backend, info=info))
            except Exception as exc:  # _Interrupted is not an Exception: a pause or abort passes through
                reason = str(exc) if isinstance(exc, EngineBuildError) else f"{backend.value}: {type(exc).__name__}: {str(exc).strip()[:300]}"
                outcomes.append(BuildOutcome(backend, reason=reason))  # e.g. engine.json not writable: still only "serve torch"
        return outcomes

    return _unwrapping(build_all)
