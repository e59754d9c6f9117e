"""Serving engines (issue 21): a model version served by torch, onnxruntime or TensorRT.

    build.build_engine / build_engines   (cycle worker, torch)  export → build → verify → engine.json
    load.load_engine                     (serving, numpy only)  reuse a cached engine if it fits
    select.select_engine                 (serving, numpy only)  serving_backend = auto | torch | …

This package's __init__ and every module but build.py and eager.py import neither torch nor
torchvision, so a process serving through onnxruntime or TensorRT stays light.
"""
from __future__ import annotations

from .base import Backend, BuildOutcome, Engine, EngineBuildError, EngineInfo, EngineUnavailable, InputSpec, Precision, Unavailable
from .load import available, check_engine, load_engine
from .select import Selection, ServingBackend, backends_to_build, select_engine

__all__ = [
    "Backend", "BuildOutcome", "Engine", "EngineBuildError", "EngineInfo", "EngineUnavailable", "InputSpec", "Precision", "Unavailable",
    "available", "check_engine", "load_engine", "Selection", "ServingBackend", "backends_to_build", "select_engine",
]
