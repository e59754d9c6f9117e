"""onnxruntime engines over the version's `model.onnx`: the CPU execution provider, CUDA's where
this onnxruntime has it. numpy only (no torch), so a serving process on this backend stays light.

The TensorRT backend (trt.py) is this same engine with TensorRT's execution provider in front.
The optimised graph is not cached next to model.onnx: opening a session from a saved optimised
copy saves tens of milliseconds per load (bench/engine_bench.py), but a graph saved at level ALL
is specific to the CPU that optimised it and would be one more file to verify and invalidate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .base import Backend, Engine, EngineInfo, EngineUnavailable, InputSpec, Unavailable

ONNX_FILE = "model.onnx"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# An execution provider and its options, in onnxruntime's order of preference.
Provider = Tuple[str, Dict[str, Any]]


def available() -> Tuple[bool, str]:
    """(True, what is installed) or (False, why not)."""
    try:
        import onnxruntime
    except ImportError as exc:
        return False, f"onnxruntime is not installed ({exc}); pip install onnxruntime (onnxruntime-gpu for CUDA)"
    return True, f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"


def runtime_versions() -> Dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def providers() -> List[Provider]:
    """The onnxruntime backend's providers: CUDA when this build has it, always the CPU."""
    import onnxruntime

    found = onnxruntime.get_available_providers()
    return ([(CUDA, {"device_id": 0})] if CUDA in found else []) + [(CPU, {})]


def session_options(threads: Optional[int]) -> Any:
    """Tuned for serving: every graph optimisation, one request's ops in sequence, `threads`
    intra-op threads (None: onnxruntime's default, one per physical core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
    # Idle intra-op threads sleep instead of spinning for the next op: spinning buys a few
    # microseconds of wake-up per op and burns the cores that the event loop, JPEG decoding and
    # the cycle worker need (bench/RESULTS.md, 2026-12-03 "Serving on the merged code").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: provider fallbacks are checked below, not logged
    return options


class OrtEngine(Engine):
    """An onnxruntime session over an ONNX file. The first provider in `chosen` must be the one
    the session really runs on: onnxruntime silently falls back to the next provider when one
    cannot start (a missing libnvinfer, no GPU), and a fallback must not pass for the backend."""

    def __init__(self, path: Path, spec: InputSpec, chosen: List[Provider], backend: Backend = Backend.ONNXRUNTIME,
                 threads: Optional[int] = None, info: Optional[EngineInfo] = None):
        super().__init__(spec, info)
        import onnxruntime

        self.backend = backend
        self.threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), sess_options=session_options(threads),
                providers=[name for name, _ in chosen], provider_options=[opts for _, opts in chosen],
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise EngineUnavailable(Unavailable.CORRUPT, f"{path}: onnxruntime cannot load it ({str(exc).strip()[:300]})") from None
        running = self.session.get_providers()
        if chosen[0][0] not in running:
            raise EngineUnavailable(Unavailable.NOT_INSTALLED, f"{chosen[0][0]} did not start (the session runs on {', '.join(running)})")
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    @property
    def providers(self) -> List[str]:
        return list(self.session.get_providers())

    @property
    def device(self) -> str:
        return "cpu" if self.providers[0] == CPU else "cuda"

    @property
    def name(self) -> str:
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return f"{self.backend.value} ({self.providers[0]}{threads})"

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: x})[0]
