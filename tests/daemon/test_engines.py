"""daemon.engines: engines built from real models answer like torch on real images, are reused only
while they fit the installed runtime, fail loudly when they do not verify, and the serving side
(onnxruntime, TensorRT) runs without torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.engines import (
    Backend, EngineBuildError, EngineUnavailable, InputSpec, Precision, ServingBackend, Unavailable, check_engine,
    load_engine, select_engine,
)
from daemon.engines import trt
from daemon.engines.base import ENGINE_JSON, read_engines
from daemon.engines.build import build_engine, build_engines
from daemon.engines.eager import TorchEngine
from daemon.engines.verify import TOLERANCES
from prune_core import ModelCard, PruneSpec, build_model, get_criterion, load_model, prune_to_level
from prune_core.datasets import MNIST_CLASSES

REPO = Path(__file__).resolve().parents[2]
ORT = Backend.ONNXRUNTIME


@pytest.fixture(scope="module")
def images(digits) -> np.ndarray:
    """200 real MNIST digits (20 per class), uint8 N×3×32×32: the stand-in for held-out buffer samples."""
    index = torch.cat([torch.nonzero(digits.labels == c)[:20, 0] for c in range(10)])
    return digits.images[index].numpy()


def card_for(arch: str) -> ModelCard:
    return ModelCard(arch, 10, MNIST_CLASSES, 32)


def assert_answers_like_torch(engine, model: torch.nn.Module, images: np.ndarray) -> None:
    """Logits within the FP32 tolerance of torch's, and the same top-1 wherever torch's is decisive
    (which must be most images, or the comparison means little)."""
    want = TorchEngine(model, engine.spec, torch.device("cpu")).logits(images)
    got = engine.logits(images)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(images), engine.spec.num_classes)
    allowed = TOLERANCES[Precision.FP32].allowed(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed)
    top2 = np.sort(want, 1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * allowed
    assert decisive.mean() > 0.9
    assert (want.argmax(1) == got.argmax(1))[decisive].all()
    assert len(set(want.argmax(1).tolist())) > 1, "a model answering one class for everything proves little"


class Scripted:
    """The worker's control value as the daemon sets it, scripted by read: `script(n)` is the
    Control for the n-th read (from 1). Records every value read."""

    def __init__(self, script):
        self.script, self.reads = script, []

    @property
    def value(self) -> int:
        v = self.script(len(self.reads) + 1)
        self.reads.append(v)
        return v


def candidate_job(**kw):
    from daemon.workers.worker import CycleJob

    fields = dict(cycle_id="c1", buffer_path="", model_dir="", served_version="v0001", staging_dir="", max_sample_id=0,
                  level=0.5, criterion="l1", allocation="uniform", epochs=1, finetune_before=0, tolerance=0.0, batch_size=8,
                  min_steps=0, hflip=False, max_accuracy_drop=0.1, min_size_gain=0.0, device=None, nice=0,
                  engine_backends=(ORT.value,), serving_threads=1)
    return CycleJob(**{**fields, **kw})


def test_the_worker_honours_abort_and_pause_inside_an_engine_build(tmp_path, base_model_dir, images):
    """build_candidate_engines checks the worker's control between the build's steps: an abort
    after the export stops the build there (nothing recorded, Aborted reaches the worker, not a
    build failure), and a pause blocks it until resumed, then the engine is built and verified."""
    from daemon.workers.worker import Aborted, Control, build_candidate_engines, obey

    model, card = load_model(base_model_dir)
    aborting = Scripted(lambda n: Control.ABORT if n >= 3 else Control.RUN)  # obey reads twice: check 1 (before the backend) runs
    staging = tmp_path / "aborted"
    staging.mkdir()
    with pytest.raises(Aborted):
        build_candidate_engines(model, card, str(staging), images, candidate_job(), lambda: obey(aborting, poll_s=0.001))
    assert (staging / "model.onnx").is_file() and read_engines(staging) == {}  # exported, then stopped before recording
    assert len(aborting.reads) == 4  # the second check (after the export) raised

    checks = []
    pausing = Scripted(lambda n: Control.PAUSE if 5 <= n < 10 else Control.RUN)

    def check() -> None:
        checks.append(len(pausing.reads))
        obey(pausing, poll_s=0.001)

    staging = tmp_path / "paused"
    staging.mkdir()
    [outcome] = build_candidate_engines(model, card, str(staging), images, candidate_job(), check)
    assert outcome.info is not None and outcome.info.verification.top1_mismatches == 0, outcome.reason
    assert pausing.reads.count(Control.PAUSE) == 5 and checks[2] == 4  # the third check (after opening) blocked, then went on
    assert read_engines(staging) == {ORT: outcome.info}


def test_trained_cifar_small_build_commit_load(tmp_path, base_model_dir, images):
    """The worker's path: build into a staging directory, rename it to its version, load from there."""
    model, card = load_model(base_model_dir)
    staging = tmp_path / ".staging-1"
    staging.mkdir()
    info = build_engine(model, card, staging, ORT, torch.from_numpy(images))
    v = info.verification
    assert (v.images, v.top1_mismatches, v.top1_agreement) == (len(images), 0, 1.0)
    assert 0 <= v.max_abs_diff <= v.allowed_diff
    assert info.runtime["onnxruntime"] and info.providers[-1] == "CPUExecutionProvider" and info.build_seconds > 0
    assert info.input == InputSpec.of(card) and info.precision is Precision.FP32
    assert read_engines(staging) == {ORT: info}  # engine.json round-trips

    version = tmp_path / "v0001"
    os.replace(staging, version)
    engine = load_engine(version, ORT, threads=1)
    assert engine.backend is ORT and engine.info == info and "CPUExecutionProvider" in engine.name
    assert_answers_like_torch(engine, model, images)
    with pytest.raises(ValueError, match="uint8"):
        engine.logits(images.astype(np.float32))
    with pytest.raises(ValueError, match="32"):
        engine.logits(np.zeros((1, 3, 28, 28), np.uint8))


def test_predict_answers_as_the_torch_serving_path(tmp_path, base_model_dir, images):
    """Engine.predict gives what serving.Served.predict gives for the same model: same top-k
    classes wherever the probabilities are apart, probabilities within the tolerance."""
    from daemon.serving.serving import load_served

    model, card = load_model(base_model_dir)
    build_engine(model, card, tmp_path, ORT, images)
    engine = load_engine(tmp_path, ORT, threads=1)
    answers = load_served("v0001", base_model_dir, "cpu", backend="torch").predict(images, top_k=3, track=False)
    want = [a.top for a in answers]  # served without the prior correction: the model's own answers
    got = engine.predict(images, top_k=3)
    assert len(got) == len(want) == len(images) and all(len(g) == 3 for g in got)
    apart = [w[0][1] - w[1][1] > 1e-3 for w in want]
    assert sum(apart) > 0.9 * len(images)
    for g, w, a in zip(got, want, apart):
        assert g[0][0] == w[0][0] or not a
        np.testing.assert_allclose([p for _, p in g], [p for _, p in w], rtol=0, atol=1e-4)
    assert [len(r) for r in TorchEngine(model, engine.spec).predict(images[:2], top_k=20)] == [10, 10]  # k capped at K


def test_resnet18_at_32px(tmp_path, images, randomise_bn):
    torch.manual_seed(0)
    model = randomise_bn(build_model("resnet18", 10), seed=1)
    with torch.no_grad():  # untrained classifier weights are small: make the logits (and margins) sizeable
        model.fc.weight.mul_(50)
    build_engine(model, card_for("resnet18"), tmp_path, ORT, images)
    assert_answers_like_torch(load_engine(tmp_path, ORT, threads=1), model, images)


def test_pruned_cifar_small(tmp_path, base_model_dir, images):
    """The trained model pruned by half (as in tests/conftest.py's pruned_cifar_small, which is untrained)."""
    model, card = load_model(base_model_dir)
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.5), 32)
    pruned = outcome.model.eval()
    assert outcome.params_after < 0.6 * outcome.params_before
    outcomes = build_engines(pruned, card, tmp_path, images, backends=[ORT])
    assert [(o.backend, o.reason) for o in outcomes] == [(ORT, None)]
    assert_answers_like_torch(load_engine(tmp_path, ORT, threads=1), pruned, images)


@pytest.fixture
def built(tmp_path, images) -> tuple[Path, torch.nn.Module]:
    """A version directory with a verified onnxruntime engine for a randomised cifar_small."""
    torch.manual_seed(0)
    model = build_model("cifar_small", 10).eval()
    build_engine(model, card_for("cifar_small"), tmp_path, ORT, images[:32])
    return tmp_path, model


def rewrite_engine_json(version: Path, change) -> None:
    data = json.loads((version / ENGINE_JSON).read_text())
    change(data["engines"]["onnxruntime"])
    (version / ENGINE_JSON).write_text(json.dumps(data))


@pytest.mark.parametrize("damage, kind, words", [
    (lambda v: rewrite_engine_json(v, lambda e: e["runtime"].update(onnxruntime="0.0.1")), Unavailable.INCOMPATIBLE, "onnxruntime 0.0.1 ->"),
    (lambda v: rewrite_engine_json(v, lambda e: e.update(providers=["NoSuchExecutionProvider"])), Unavailable.INCOMPATIBLE, "NoSuchExecutionProvider"),
    (lambda v: (v / ENGINE_JSON).write_text("{not json"), Unavailable.CORRUPT, "unreadable"),
    (lambda v: (v / ENGINE_JSON).write_text('{"format": "edgetune-engines", "format_version": 1, "engines": {"onnxruntime": {}}}'),
     Unavailable.CORRUPT, "missing or invalid field"),
    (lambda v: (v / "model.onnx").write_bytes((v / "model.onnx").read_bytes()[:-10]), Unavailable.CORRUPT, "checksum"),
    (lambda v: (v / "model.onnx").unlink(), Unavailable.CORRUPT, "missing"),
    (lambda v: (v / ENGINE_JSON).unlink(), Unavailable.NOT_BUILT, "no onnxruntime engine"),
], ids=["runtime-version", "provider", "bad-json", "bad-field", "altered-onnx", "missing-onnx", "no-engine-json"])
def test_unfit_engine_is_reported_and_torch_serves(built, damage, kind, words):
    version, _ = built
    check_engine(version, ORT)  # intact before the damage
    damage(version)
    with pytest.raises(EngineUnavailable) as caught:
        load_engine(version, ORT)
    assert caught.value.kind is kind and words in caught.value.reason and caught.value.rebuild
    for setting in (ServingBackend.ONNXRUNTIME, ServingBackend.AUTO):
        selection = select_engine(setting, version)
        assert selection.backend is Backend.TORCH and selection.engine is None
        assert words in selection.skipped[ORT] and selection.rebuild == (ORT,)


class ExportDiverges(torch.nn.Module):
    """A model whose exported graph differs from its eager forward (the failure verification exists for)."""

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x):
        y = self.model(x)
        if torch.onnx.is_in_onnx_export():
            if self.mode == "unexportable":
                raise RuntimeError("an operator the exporter does not know")
            return y.flip(1) if self.mode == "top1" else y + 0.01
        return y


@pytest.mark.parametrize("mode, words", [
    ("top1", "top-1 differs from torch"), ("offset", "logits differ from torch by 0.01"), ("unexportable", "ONNX export failed"),
])
def test_failed_verification_raises_and_drops_the_old_record(built, images, mode, words):
    version, model = built
    with pytest.raises(EngineBuildError, match=words):
        build_engine(ExportDiverges(model, mode), card_for("cifar_small"), version, ORT, images[:32])
    assert read_engines(version) == {}  # the earlier verified engine is not left to be loaded
    with pytest.raises(EngineUnavailable) as caught:
        load_engine(version, ORT)
    assert caught.value.kind is Unavailable.NOT_BUILT


def test_build_refuses_without_images_or_with_fp16_on_the_cpu(tmp_path):
    model = build_model("cifar_small", 10).eval()
    with pytest.raises(EngineBuildError, match="no images"):
        build_engine(model, card_for("cifar_small"), tmp_path, ORT, np.zeros((0, 3, 32, 32), np.uint8))
    with pytest.raises(EngineBuildError, match="FP16"):
        build_engine(model, card_for("cifar_small"), tmp_path, ORT, np.zeros((1, 3, 32, 32), np.uint8), precision=Precision.FP16)


def test_auto_serves_the_fastest_by_measurement(built):
    version, model = built
    torch_engine = TorchEngine(model, InputSpec.of(card_for("cifar_small")))
    for fastest in (Backend.TORCH, ORT):
        measure = lambda engine: 1.0 if engine.backend is fastest else 2.0  # noqa: E731 (timings injected, not measured)
        selection = select_engine("auto", version, torch_engine, threads=1, measure=measure)
        assert selection.backend is fastest and selection.engine.backend is fastest
        assert set(selection.latency_ms) == {Backend.TORCH, ORT} and selection.rebuild == ()
        slower = ({Backend.TORCH, ORT} - {fastest}).pop()
        assert selection.skipped[slower].startswith("slower")
    assert select_engine("torch", version, torch_engine).engine is torch_engine
    explicit = select_engine("onnxruntime", version, torch_engine, threads=1)
    assert explicit.backend is ORT and explicit.latency_ms == {}  # nothing to compare against


def test_tensorrt_unavailable_is_a_reason_not_a_crash(tmp_path, images):
    ok, why = trt.available()
    if ok:
        pytest.skip(f"TensorRT is available here ({why}); test_tensorrt_engine covers it")
    model = build_model("cifar_small", 10).eval()
    outcomes = build_engines(model, card_for("cifar_small"), tmp_path, images[:8])
    assert [o.backend for o in outcomes] == [ORT, Backend.TENSORRT]
    assert outcomes[0].info is not None and outcomes[1].info is None and why in outcomes[1].reason
    with pytest.raises(EngineBuildError, match="not available"):
        build_engine(model, card_for("cifar_small"), tmp_path, Backend.TENSORRT, images[:8])
    with pytest.raises(EngineUnavailable) as caught:
        load_engine(tmp_path, Backend.TENSORRT)
    assert caught.value.kind is Unavailable.NOT_INSTALLED and not caught.value.rebuild
    selection = select_engine("tensorrt", tmp_path)
    assert selection.backend is Backend.TORCH and why in selection.skipped[Backend.TENSORRT] and selection.rebuild == ()
    assert select_engine("auto", tmp_path, threads=1).backend is ORT


def test_tensorrt_engine(tmp_path, images):
    """On a machine with TensorRT (a Jetson): FP16 engine built, verified, cached and reused."""
    ok, why = trt.available()
    if not ok:
        pytest.skip(f"TensorRT unavailable: {why}")
    torch.manual_seed(0)
    model = build_model("cifar_small", 10).eval()
    info = build_engine(model, card_for("cifar_small"), tmp_path, Backend.TENSORRT, images)
    assert info.precision is Precision.FP16 and info.providers[0] == "TensorrtExecutionProvider"
    assert info.verification.top1_mismatches == 0 and info.runtime["libnvinfer"] != "none"
    assert list((tmp_path / trt.CACHE_DIR).glob("*.engine"))
    engine = load_engine(tmp_path, Backend.TENSORRT)
    got, want = engine.logits(images), TorchEngine(model, info.input).logits(images)
    assert np.max(np.abs(got - want)) <= TOLERANCES[Precision.FP16].allowed(want)


LIGHT_SERVER = """
import sys
import numpy as np
from daemon.engines import load_engine, select_engine
from daemon.engines import ort, trt, select, load, base, verify
images = np.load(sys.argv[2])
selection = select_engine("auto", sys.argv[1], threads=1)
np.save(sys.argv[3], selection.engine.logits(images))
heavy = sorted(m for m in ("torch", "torchvision", "safetensors.torch", "prune_core.model_format") if m in sys.modules)
print(selection.backend.value, heavy)
"""


def test_serving_side_never_imports_torch(built, images, tmp_path_factory):
    """A fresh interpreter loads, selects and runs the engine with numpy and onnxruntime alone."""
    version, model = built
    out = tmp_path_factory.mktemp("light")
    np.save(out / "images.npy", images[:16])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", LIGHT_SERVER, str(version), str(out / "images.npy"), str(out / "logits.npy")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["onnxruntime", "[]"]
    want = TorchEngine(model, InputSpec.of(card_for("cifar_small"))).logits(images[:16])
    np.testing.assert_allclose(np.load(out / "logits.npy"), want, rtol=0, atol=TOLERANCES[Precision.FP32].allowed(want))
