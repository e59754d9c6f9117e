"""A light serving process (issue 21): the serving side imports neither torch nor torchvision.

Each check runs in a fresh interpreter (this one has torch loaded) and fails naming the chain of
imports that pulled torch in.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# Torch-free now: what the serving process needs to read a model, decode a request, calibrate and
# correct answers, watch for drift and keep its state.
TORCH_FREE = [
    "prune_core.card", "prune_core.imagedecode", "prune_core.label_shift", "prune_core.online_prior", "prune_core.device", "prune_core.atomic",
    "prune_core.arch_names", "prune_core.options", "prune_core.evidence", "prune_core.cost_records",
    "daemon.serving.prior_adapter", "daemon.serving.drift", "daemon.serving.generalist", "daemon.serving.serving", "daemon.serving.batcher",
    "daemon.storage.model_store", "daemon.storage.buffer",
    "daemon.cycles.cycle_records", "daemon.cycles.gate", "daemon.cycles.acceptance", "daemon.cycles.report", "daemon.serving.installer",
    "daemon.cycles.recovery", "daemon.cycles.scheduler", "daemon.cycles.cycle_cost",
    "daemon.workers.supervisor", "daemon.workers.worker", "daemon.workers.events", "daemon.workers.child_process",
    "daemon.ops.metrics", "daemon.ops.config", "daemon.ops.telemetry", "daemon.ops.status_view",
    "daemon.engines", "daemon.runtime", "daemon.api.app", "daemon.service",
]
# Records which import first pulled torch or torchvision in, then lets it load.
PROBE = """
import sys, traceback
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "torchvision") and not hasattr(self, "chain"):
            self.chain = " <- ".join(f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_stack()[:-1])
                                     if "site-packages" not in f.filename and "<frozen" not in f.filename)
        return None
probe = Probe()
sys.meta_path.insert(0, probe)
"""
CHECK = """
leaked = [m for m in ("torch", "torchvision") if m in sys.modules]
assert not leaked, f"{leaked} imported via {getattr(probe, 'chain', '?')}"
"""


def run_without_torch(code: str) -> None:
    """Run `code` in a fresh interpreter in the repository; fail if it imported torch or torchvision."""
    result = subprocess.run([sys.executable, "-c", PROBE + code + CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_serving_modules_import_without_torch():
    run_without_torch("".join(f"import {m}\n" for m in TORCH_FREE))


def test_a_request_is_decoded_calibrated_and_corrected_without_torch(tmp_path, untrained_model_dir):
    """Card, preprocessing, decoding, the prior adapter, the drift watch, the settings and a cycle's
    options, run for real."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo, "JPEG")
    run_without_torch(f"""
import numpy as np
from daemon.serving.drift import DriftSettings, DriftWatch
from daemon.serving.prior_adapter import ModelPrior, PriorAdapter, PriorSettings
from prune_core.card import read_card
from prune_core.imagedecode import decode_array
card = read_card({str(untrained_model_dir)!r})
image = decode_array(open({str(photo)!r}, 'rb').read(), card.preprocess)
assert image.dtype == np.uint8 and image.shape == (3, card.input_size, card.input_size)
adapter, model = PriorAdapter(PriorSettings(min_samples=2, window=8)), ModelPrior.of("v0001", card)
logits = np.random.default_rng(0).normal(size=(4, card.num_classes)).astype(np.float32)
a = adapter.answer(model, logits)
adapter.refresh(model)
assert a.served.shape == a.raw.shape == (4, card.num_classes) and adapter.view(model).estimate is not None
DriftWatch(card, DriftSettings(window=8, min_samples=2)).observe(logits)
from daemon.ops.config import load_settings
from prune_core.options import check_cycle_options
load_settings(state_dir={str(tmp_path / "state")!r})  # validates the criteria and allocations lists
assert check_cycle_options("auto", "taylor,apoz", "uniform,global") == "auto"
""")


def test_the_generalist_runs_through_its_onnxruntime_engine_without_torch(tmp_path, untrained_model_dir):
    """With an engine built into its version directory, the generalist watch loads and runs it
    without torch (the engine is built here, in the test process, as the cycle worker would)."""
    import torch

    from daemon.engines import Backend, InputSpec
    from daemon.engines.build import build_engine
    from prune_core.model_format import load_model

    version = tmp_path / "v0001"
    shutil.copytree(untrained_model_dir, version)
    model, card = load_model(version)
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    build_engine(model, card, version, Backend.ONNXRUNTIME, images)
    from daemon.engines.eager import TorchEngine
    from daemon.engines.verify import TOLERANCES, Precision

    want = TorchEngine(model, InputSpec.of(card), torch.device("cpu")).logits(images)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "want.npy", want)
    run_without_torch(f"""
import numpy as np
from daemon.serving.generalist import load_logits
logits = load_logits({str(version)!r}, "onnxruntime")
assert logits.__self__.backend.value == "onnxruntime"
got = logits(np.load({str(tmp_path / 'images.npy')!r}))
assert np.abs(got - np.load({str(tmp_path / 'want.npy')!r})).max() <= {TOLERANCES[Precision.FP32].allowed(want)!r}
""")


def test_the_device_is_named_without_torch(monkeypatch):
    """device_name: the setting, else EDGETUNE_DEVICE, else what the CUDA driver reports (asked through
    ctypes); a CUDA device the driver does not report is refused as pick_device refuses it."""
    from prune_core.device import cuda_driver_devices, device_name

    monkeypatch.delenv("EDGETUNE_DEVICE", raising=False)
    run_without_torch("from prune_core.device import device_name\ndevice_name()\n")
    assert device_name("cpu") == "cpu"
    gpus = cuda_driver_devices()
    assert device_name() == ("cuda" if gpus else "cpu")
    monkeypatch.setenv("EDGETUNE_DEVICE", "cuda:0")
    if gpus:
        assert device_name() == "cuda:0"
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            device_name()


@pytest.mark.slow
def test_a_daemon_serving_onnxruntime_never_maps_libtorch(tmp_path, untrained_model_dir, make_daemon):
    """A real `edgetune serve` with serving_backend = onnxruntime answers /infer and swaps between
    two versions (each swap loads an engine) without torch ever being loaded: torch imported at run
    time, by any path, would map libtorch into the process."""
    import io

    from daemon.engines import Backend
    from daemon.engines.build import build_engine
    from daemon.storage.model_store import ModelStore
    from prune_core.model_format import load_model

    store = ModelStore(tmp_path / "state" / "models")
    versions = [store.import_model(untrained_model_dir) for _ in range(2)]
    store.set_active(versions[0])
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    for v in versions:
        model, card = load_model(store.path(v))
        build_engine(model, card, store.path(v), Backend.ONNXRUNTIME, images)
    d = make_daemon({"EDGETUNE_SERVING_BACKEND": "onnxruntime"},
                    model=False, state_dir=tmp_path / "state").start()
    buf = io.BytesIO()
    Image.fromarray(images[0].transpose(1, 2, 0)).save(buf, "PNG")
    for v in [versions[1], versions[0]]:
        assert d.client.post(f"/models/{v}/activate").status_code == 200
        for _ in range(3):
            assert d.infer(buf.getvalue()).json()["model_version"] == v
        assert d.client.get("/status").json()["model"]["serving"]["backend"] == "onnxruntime"
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
