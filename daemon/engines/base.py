"""What every serving engine is: uint8 images in, float32 logits out, normalised inside.

Also the record of a built engine (`EngineInfo`, kept per backend in the version directory's
`engine.json`) and the typed reasons an engine cannot be used. numpy only: the serving process
imports this without torch.
"""
from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from prune_core.hashing import file_sha256  # noqa: F401 (re-exported for build and load)

ENGINE_JSON = "engine.json"
FORMAT = "edgetune-engines"
FORMAT_VERSION = 1


class Backend(str, Enum):
    TORCH = "torch"  # the reference: the model itself, eager
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class Unavailable(str, Enum):
    """Why an engine cannot be loaded; all but NOT_INSTALLED are cured by building it again."""

    NOT_INSTALLED = "not_installed"  # the runtime (or its GPU provider) is missing here
    NOT_BUILT = "not_built"  # no engine for this backend in the version directory
    INCOMPATIBLE = "incompatible"  # built for other runtime versions, providers or another GPU
    CORRUPT = "corrupt"  # engine.json or the engine file is unreadable or was altered


class EngineUnavailable(Exception):
    def __init__(self, kind: Unavailable, reason: str):
        super().__init__(f"{kind.value}: {reason}")
        self.kind = kind
        self.reason = reason

    @property
    def rebuild(self) -> bool:
        """Whether building the engine again (in the background, while torch serves) would help."""
        return self.kind is not Unavailable.NOT_INSTALLED


class EngineBuildError(RuntimeError):
    """An engine could not be built or did not pass verification; the message is the reason."""


@dataclass(frozen=True)
class InputSpec:
    """The model's input contract: uint8 N×3×S×S images, normalised by the card's mean and std."""

    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    num_classes: int

    @classmethod
    def of(cls, card: Any) -> "InputSpec":
        """From a prune_core ModelCard (duck-typed, so this module needs no torch)."""
        return cls(int(card.input_size), tuple(card.mean), tuple(card.std), int(card.num_classes))

    def zeros(self, batch: int = 1) -> np.ndarray:
        return np.zeros((batch, 3, self.input_size, self.input_size), dtype=np.uint8)


@dataclass(frozen=True)
class Verification:
    """How a built engine compared with torch on real images."""

    images: int
    max_abs_diff: float
    allowed_diff: float  # the tolerance it was held to (see verify.Tolerance)
    top1_agreement: float  # share of all images with torch's top-1
    near_ties: int  # images whose torch top-1/top-2 margin is within twice the tolerance
    top1_mismatches: int  # images outside near-ties where the engine's top-1 differs (must be 0)


@dataclass(frozen=True)
class EngineInfo:
    """One built engine, as recorded in engine.json."""

    backend: Backend
    file: str  # relative to the version directory
    file_sha256: str
    runtime: Dict[str, str]  # what it was built with: {"onnxruntime": "1.32.0", "libnvinfer": ..., "gpu": ...}
    providers: List[str]  # onnxruntime execution providers the session ran on, first = preferred
    precision: Precision
    input: InputSpec
    max_batch: int
    verification: Verification
    build_seconds: float
    built: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> Dict[str, Any]:
        body = asdict(self)
        body["backend"], body["precision"] = self.backend.value, self.precision.value
        return body

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "EngineInfo":
        spec = data["input"]
        return cls(
            backend=Backend(data["backend"]),
            file=str(data["file"]),
            file_sha256=str(data["file_sha256"]),
            runtime={str(k): str(v) for k, v in data["runtime"].items()},
            providers=[str(p) for p in data["providers"]],
            precision=Precision(data["precision"]),
            input=InputSpec(int(spec["input_size"]), tuple(float(v) for v in spec["mean"]),
                            tuple(float(v) for v in spec["std"]), int(spec["num_classes"])),
            max_batch=int(data["max_batch"]),
            verification=Verification(**data["verification"]),
            build_seconds=float(data["build_seconds"]),
            built=str(data["built"]),
        )


@dataclass(frozen=True)
class BuildOutcome:
    """One backend's build result for a version: its engine, or why there is none (served by torch).
    What the cycle record and /status show of an engine build."""

    backend: Backend
    info: Optional[EngineInfo] = None
    reason: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        info = self.info
        return {"backend": self.backend.value, "built": info is not None, "reason": self.reason,
                "verification": None if info is None else asdict(info.verification),
                "precision": None if info is None else info.precision.value,
                "build_seconds": None if info is None else info.build_seconds}


def top_classes(probs: np.ndarray, k: int) -> List[List[Tuple[int, float]]]:
    """The `k` most probable (class index, probability) per row of N×K `probs`, highest first
    (ties in class order): how every serving path turns probabilities into an answer."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(i), float(row[i])) for i in idx] for idx, row in zip(order, probs)]


def engines_document(infos: Dict[Backend, EngineInfo]) -> Dict[str, Any]:
    """The content of engine.json for `infos`."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "engines": {b.value: info.to_json() for b, info in sorted(infos.items(), key=lambda kv: kv[0].value)}}


def read_engines(version_dir: Path) -> Dict[Backend, EngineInfo]:
    """The engines recorded in `version_dir/engine.json` ({} when there is none).

    Raises EngineUnavailable(CORRUPT) when the file exists but cannot be read as engine.json."""
    path = Path(version_dir) / ENGINE_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(Unavailable.CORRUPT, f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise EngineUnavailable(Unavailable.CORRUPT, f"{path}: not an {FORMAT} v{FORMAT_VERSION} document")
    try:
        return {Backend(name): EngineInfo.from_json(body) for name, body in data["engines"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineUnavailable(Unavailable.CORRUPT, f"{path}: missing or invalid field ({type(exc).__name__}: {exc})") from None


class Engine(ABC):
    """A loaded model ready to serve. `logits` is thread-safe for the runtimes used here."""

    backend: Backend

    def __init__(self, spec: InputSpec, info: EngineInfo | None = None):
        self.spec = spec
        self.info = info
        # The same float32 arithmetic as the torch serving path: (x - mean·255) / (std·255).
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)

    @property
    @abstractmethod
    def name(self) -> str:
        """Backend and where it runs, for logs and /status (e.g. 'onnxruntime CPUExecutionProvider')."""

    @property
    def device(self) -> str:
        """Where it computes, for /status: "cpu", "cuda", …"""
        return "cpu"

    @abstractmethod
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for a normalised float32 batch."""

    def check(self, batch: np.ndarray) -> None:
        """Raise ValueError unless `batch` is uint8 N×3×S×S for this model's S."""
        s = self.spec.input_size
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise ValueError(f"{self.name}: expected uint8 N×3×{s}×{s}, got {got}")

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        self.check(batch)
        return (batch.astype(np.float32) - self._mean) / self._std

    def logits(self, batch_uint8: np.ndarray) -> np.ndarray:
        """N×K float32 logits for a uint8 batch N×3×S×S."""
        return np.asarray(self._forward(self.normalise(batch_uint8)), dtype=np.float32)

    def predict(self, batch_uint8: np.ndarray, top_k: int = 5) -> List[List[Tuple[int, float]]]:
        """Top-k (class index, probability) per image, as serving.Served.predict answers."""
        logits = self.logits(batch_uint8).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return top_classes(probs, top_k)

    def warm_up(self, runs: int = 2) -> None:
        """First runs allocate memory and pick kernels (TensorRT: load or build the engine)."""
        for _ in range(runs):
            self.logits(self.spec.zeros(1))
