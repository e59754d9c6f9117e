"""The TensorRT backend: onnxruntime's TensorRT execution provider over the same `model.onnx`,
its engine cached in the version directory (`trt_cache/`). numpy only, like ort.py.

One cache per version, never shared: onnxruntime names cached engines after the graph's structure,
so two versions with the same channel plan and other weights would load each other's engine.

Why the execution provider and not the `tensorrt` Python API: the API needs a CUDA binding
(pycuda or cuda-python, not part of JetPack's Python) to allocate and copy device buffers, a
second file format and build code path, and fails on the first unsupported layer; the provider
takes the ONNX file the other backends use, hands unsupported nodes to CUDA or the CPU, keeps
the serialised engine and timing cache keyed by TensorRT version and GPU, and lets the serving
process stay numpy-only. The cost is onnxruntime's per-call overhead on top of TensorRT's.
On a Jetson it needs an onnxruntime-gpu wheel built with TensorRT (NVIDIA's Jetson Zoo wheels for
the JetPack in use) and JetPack's libnvinfer.

What has run: `available()` on an x86 machine without a GPU (it reports why not). The provider
options follow onnxruntime's TensorRT EP documentation; no engine has been built on a GPU yet.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .base import Backend, EngineInfo, InputSpec, Precision
from .ort import CPU, CUDA, TENSORRT, OrtEngine, Provider

CACHE_DIR = "trt_cache"
WORKSPACE_BYTES = 1 << 30  # TensorRT's scratch memory while building; a Nano has 4 GB in all


def _nvinfer_version() -> Optional[str]:
    """libnvinfer's own version number (getInferLibVersion), without the tensorrt package."""
    for lib in (ctypes.util.find_library("nvinfer"), "libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        if lib is None:
            continue
        try:
            return str(ctypes.CDLL(lib).getInferLibVersion())
        except (OSError, AttributeError):
            continue
    return None


def _gpu_name() -> Optional[str]:
    """The GPU an engine is built for: a Jetson's board name, else nvidia-smi's first GPU."""
    board = Path("/proc/device-tree/model")
    if board.is_file():
        return board.read_text(errors="replace").strip("\x00 \n")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def available() -> Tuple[bool, str]:
    """(True, what is installed) or (False, why the TensorRT backend cannot run here)."""
    try:
        import onnxruntime
    except ImportError:
        return False, "onnxruntime is not installed (on a Jetson: the Jetson Zoo onnxruntime-gpu wheel for this JetPack)"
    found = onnxruntime.get_available_providers()
    if TENSORRT not in found:
        return False, f"onnxruntime {onnxruntime.__version__} has no {TENSORRT} (it has {', '.join(found)}); install an onnxruntime-gpu built with TensorRT"
    version = _nvinfer_version()
    if version is None:
        return False, "libnvinfer (TensorRT) cannot be loaded; install TensorRT (part of JetPack)"
    gpu = _gpu_name()
    if gpu is None:
        return False, "no NVIDIA GPU found (neither /proc/device-tree/model nor nvidia-smi)"
    return True, f"onnxruntime {onnxruntime.__version__} with TensorRT (libnvinfer {version}) on {gpu}"


def runtime_versions() -> Dict[str, str]:
    """What a cached engine depends on: onnxruntime, TensorRT and the GPU it was tuned for."""
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "libnvinfer": _nvinfer_version() or "none", "gpu": _gpu_name() or "none"}


def providers(version_dir: Path, spec: InputSpec, precision: Precision, max_batch: int) -> List[Provider]:
    """TensorRT first (engine cache in the version directory, one optimisation profile from
    batch 1 to `max_batch`, tuned for batch 1), then CUDA and the CPU for what it cannot run."""
    cache = Path(version_dir) / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    shape = f"x3x{spec.input_size}x{spec.input_size}"
    options = {
        "device_id": 0,
        "trt_fp16_enable": precision is Precision.FP16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": WORKSPACE_BYTES,
        "trt_profile_min_shapes": f"input:1{shape}",
        "trt_profile_opt_shapes": f"input:1{shape}",
        "trt_profile_max_shapes": f"input:{max_batch}{shape}",
    }
    return [(TENSORRT, options), (CUDA, {"device_id": 0}), (CPU, {})]


def open_engine(onnx_path: Path, version_dir: Path, spec: InputSpec, precision: Precision, max_batch: int,
                info: Optional[EngineInfo] = None) -> OrtEngine:
    """A TensorRT engine, loaded from the cache. Without a matching cache entry TensorRT builds
    one (minutes on a Nano): load_engine refuses engines built for other versions first, so only
    the builder (cycle worker or background rebuild) ever builds."""
    return OrtEngine(onnx_path, spec, providers(version_dir, spec, precision, max_batch), Backend.TENSORRT, info=info)
