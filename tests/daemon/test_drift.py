"""daemon.serving.drift: the generalist notices a class the specialist was not trained for."""
from __future__ import annotations

import numpy as np
import torch

from daemon.serving.drift import DriftSettings, DriftWatch
from prune_core.model_format import ModelCard

NAMES = ["a", "b", "c", "d"]


def _logits(labels: torch.Tensor, seed: int) -> np.ndarray:
    """A fairly good generalist: the true class gets a clear margin over noise (float32, as an engine answers)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), 4, generator=g)
    logits[torch.arange(len(labels)), labels] += 3.0
    return logits.numpy()


def test_a_class_the_specialist_never_saw_is_reported_once_frequent():
    generalist = ModelCard("cifar_small", 4, NAMES, 32)
    specialist = ModelCard("cifar_small", 4, NAMES, 32, class_prior=[0.33, 0.33, 0.33, 0.01])
    watch = DriftWatch(generalist, DriftSettings(window=100, min_samples=40, appear_share=0.1, trained_share=0.02))
    assert watch.appeared(specialist) is None  # no samples yet
    watch.observe(_logits(torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(1)), 0))
    assert watch.appeared(specialist) is None  # a, b, c only: what it was specialised for
    watch.observe(_logits(torch.full((30,), 3), 1))  # d arrives: 30 of the last 100
    found = watch.appeared(specialist)
    assert found is not None and found.classes == ["d"] and 0.2 < found.shares[0] < 0.4
    assert "d at" in found.describe()
    # the generalist itself (uniform prior) or a model of other classes never triggers
    assert watch.appeared(generalist) is None
    assert watch.appeared(ModelCard("cifar_small", 4, list("wxyz"), 32, class_prior=[0.3, 0.3, 0.4, 0.0])) is None


def test_the_generalist_watch_runs_any_forward_pass_and_asks_for_the_fallback(untrained_model_dir):
    """GeneralistWatch with an injected forward pass (numpy uint8 in, logits out, as an engine's):
    sampled images of a specialist reach it, and a class the specialist was not trained for
    triggers the fallback once."""
    import threading

    from daemon.serving.generalist import GeneralistWatch

    seen, appeared = [], threading.Event()
    found = []

    def forward(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.uint8 and batch.shape == (1, 3, 32, 32)
        seen.append(batch)
        logits = np.zeros((1, 10), np.float32)
        logits[0, 9] = 8.0  # every sampled image looks like the last class
        return logits

    settings = DriftSettings(sample_every=2, window=20, min_samples=10, appear_share=0.1, trained_share=0.02)
    watch = GeneralistWatch("v0001", untrained_model_dir, settings, lambda a: (found.append(a), appeared.set()),
                            logits=lambda: forward)
    generalist = ModelCard("cifar_small", 10, [str(i) for i in range(10)], 32)
    specialist = ModelCard("cifar_small", 10, generalist.class_names, 32, class_prior=[0.25] * 4 + [0.0] * 6)
    watch.start()
    try:
        image = np.zeros((3, 32, 32), np.uint8)
        watch.offer("v0001", generalist, image)  # the generalist itself is never watched
        for _ in range(40):
            watch.offer("v0002", specialist, image)
        assert appeared.wait(30)
    finally:
        watch.stop()
    assert len(seen) == 20  # every second of the specialist's 40 images
    assert found[0].classes == [specialist.class_names[9]]


def test_the_generalist_runs_through_its_engine_where_one_is_built(tmp_path, untrained_model_dir):
    """load_logits: without a built engine the torch model answers; once an onnxruntime engine is
    built into the version directory it answers, with the same logits within the engines' tolerance."""
    import shutil

    from daemon.engines import Backend
    from daemon.engines.build import build_engine
    from daemon.engines.verify import TOLERANCES, Precision
    from daemon.serving.generalist import load_logits
    from prune_core.model_format import load_model

    version = tmp_path / "v0001"
    shutil.copytree(untrained_model_dir, version)
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    by_torch = load_logits(version, "onnxruntime")
    assert by_torch.__self__.backend is Backend.TORCH  # nothing built yet: torch answers
    want = by_torch(images)
    model, card = load_model(version)
    build_engine(model, card, version, Backend.ONNXRUNTIME, images)
    by_engine = load_logits(version, "onnxruntime")
    assert by_engine.__self__.backend is Backend.ONNXRUNTIME
    np.testing.assert_allclose(by_engine(images), want, rtol=0, atol=TOLERANCES[Precision.FP32].allowed(want))
    assert load_logits(version, "torch").__self__.backend is Backend.TORCH  # the torch backend keeps torch
