"""prune_core.cost: the extrapolation, the phase sums and the budget rule on a made-up profile (no
timing), and the measurements it rests on (saved activations, the peak-memory mark) on real models."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prune_core.architectures import build_model
from prune_core.cost import (
    CyclePlan, DoesNotFit, Line, MemorySource, Phase, Profile, ProfileSample, estimate, fit_budget,
    profile, profile_batches, saved_mb,
)
from prune_core.cycle import CycleConfig
from prune_core.data import ImageSet
from prune_core.retrain import TrainConfig


def fake_profile(**kw) -> Profile:
    """Memory: 500 MiB + 2 MiB per sample; a step: 0.1 s + 0.01 s per sample; 1 s per train() run once
    warm (5 s cold, at the first profiled batch)."""
    samples = tuple(ProfileSample(b, 500 + 2 * b + 7, 0.1 + 0.01 * b, 3 + 2 * b, 5.0 if b == 8 else 1.0) for b in (8, 16))
    args = dict(samples=samples, eval_batch=256, eval_extra_mb=5.0, eval_image_s=0.001, model_mb=10.0,
                source=MemorySource.RSS, device="cpu", seconds=2.0)
    return Profile(**{**args, **kw})


def test_line_fit_is_least_squares_and_never_slopes_down():
    assert Line.fit([(8, 116), (16, 132)]) == Line(100.0, 2.0)
    line = Line.fit([(2, 10), (4, 14), (8, 22)])
    assert math.isclose(line.fixed, 6) and math.isclose(line.per_sample, 2)
    assert Line.fit([(8, 120), (16, 100)]) == Line(110.0, 0.0)  # allocator noise, not a real slope
    with pytest.raises(ValueError, match="two or more"):
        Line.fit([(8, 1), (8, 2)])


def test_memory_line_takes_its_slope_from_saved_tensors_and_its_intercept_from_the_largest_peak():
    memory = fake_profile().memory
    assert memory.per_sample == 2  # the saved tensors' slope, not the peaks'
    assert memory.at(16) == 500 + 2 * 16 + 7  # through the peak measured at the largest batch


def test_estimate_sums_the_phases_of_a_retrain():
    p = fake_profile()
    config = TrainConfig(epochs=2, batch_size=32)
    est = estimate(p, CyclePlan.of_retrain(config, train_samples=320, held_samples=100), 32)
    steps = 2 * 10  # 2 epochs × 320/32 batches
    held_passes = 2 + 2  # before, after each epoch, and the teacher's answers once
    assert math.isclose(est.duration_s, 1.0 + steps * (0.1 + 0.01 * 32) + held_passes * 100 * 0.001)
    assert est.phases[Phase.PROBES.value] == est.phases[Phase.RANKING.value] == est.phases[Phase.VALIDATION.value] == 0
    assert est.train_peak_mb == 500 + 2 * 32 + 7 and est.batch_size == 32
    assert est.peak_mb == est.eval_peak_mb == est.train_peak_mb + 5  # the heap keeps what training freed: they add up
    # the last stages re-estimate the frozen front's statistics first: one pass over the training samples
    last = estimate(fake_profile(scope="last"), CyclePlan.of_retrain(config, train_samples=320, held_samples=100), 32)
    assert math.isclose(last.duration_s - est.duration_s, 320 * 0.001)
    cuda = estimate(fake_profile(source=MemorySource.CUDA), CyclePlan.of_retrain(config, 320, 100), 32)
    assert cuda.peak_mb == cuda.train_peak_mb and cuda.eval_peak_mb == 500 + 7 + 5  # live tensors only: the larger


def test_min_steps_and_a_last_batch_of_one_count_as_train_does():
    p = fake_profile(eval_image_s=0.0)
    config = TrainConfig(epochs=1, batch_size=32, min_steps=30)
    est = estimate(p, CyclePlan.of_retrain(config, train_samples=65, held_samples=1), 32)
    # 3 batches per epoch, the last (one sample) skipped; min_steps=30 stretches it to 10 epochs
    assert math.isclose(est.duration_s, 1.0 + 10 * 2 * (0.1 + 0.01 * 32))


def test_a_cycle_plan_counts_probes_tries_rankings_and_copies():
    config = CycleConfig(level="auto", criterion="activation,taylor", allocation="uniform,global", finetune_before=0,
                         train=TrainConfig(epochs=3, batch_size=16))
    plan = CyclePlan.of_cycle(config, 160, 40, extra_models=2)
    assert (plan.probes, plan.tries, plan.forward_rankings, plan.backward_rankings) == (5, 4, 1, 1)
    assert plan.finetune_epochs == 3  # the ceiling is fine-tuned with the retraining budget
    p = fake_profile()
    est = estimate(p, plan, 16)
    step, run, held_pass = 0.1 + 0.01 * 16, 1.0 + 3 * 10 * (0.1 + 0.01 * 16), 40 * 0.001
    retrain = run + 5 * held_pass
    assert math.isclose(est.phases[Phase.PROBES.value], 5 * 4 * (retrain + held_pass))
    assert math.isclose(est.phases[Phase.RANKING.value], 10 * (16 * 0.001 + step))
    assert math.isclose(est.phases[Phase.FINETUNE.value], retrain)
    assert math.isclose(est.duration_s, sum(est.phases.values()))
    assert est.train_peak_mb == 500 + 2 * 16 + 7 + 2 * 10  # two more copies of the model
    fixed = CyclePlan.of_cycle(CycleConfig(level=0.5, criterion="l1"), 160, 40)
    assert (fixed.probes, fixed.tries, fixed.forward_rankings, fixed.finetune_epochs) == (1, 1, 0, 0)


def test_the_budget_picks_the_largest_batch_that_fits():
    p, plan = fake_profile(), CyclePlan.of_retrain(TrainConfig(), 320, 100)
    assert fit_budget(p, plan, 64, None).batch_size == 64
    assert fit_budget(p, plan, 64, 10_000).batch_size == 64
    est = fit_budget(p, plan, 64, 560)  # 507 + 2·b + 5 ≤ 560 → b = 24
    assert est.batch_size == 24 and est.peak_mb <= 560
    assert estimate(p, plan, 25).peak_mb > 560
    assert fit_budget(fake_profile(source=MemorySource.CUDA), plan, 64, 560).batch_size == 26  # 507 + 2·b ≤ 560


def test_the_budget_refuses_with_a_reason_when_nothing_fits():
    p, plan = fake_profile(), CyclePlan.of_retrain(TrainConfig(), 320, 100)
    cuda = fake_profile(source=MemorySource.CUDA, eval_extra_mb=0.0)
    with pytest.raises(DoesNotFit, match=r"peak 511 MiB at the smallest batch size \(2\) is over cycle_memory_budget_mb=510") as info:
        fit_budget(cuda, plan, 64, 510)
    assert info.value.estimate.batch_size == 2
    with pytest.raises(DoesNotFit, match=r"held-out evaluation .* smallest batch size \(2\)"):  # training at batch 2 fits
        fit_budget(fake_profile(source=MemorySource.CUDA, eval_extra_mb=300.0), plan, 64, 800)
    with pytest.raises(DoesNotFit, match="peak 516 MiB of the held-out evaluation"):  # resident set: 511 + 5
        fit_budget(p, plan, 64, 514)


def test_profile_batches_are_a_quarter_and_a_half():
    assert profile_batches(64) == (16, 32)
    assert profile_batches(8) == (2, 4)
    assert profile_batches(2) == (2, 4)


def _images(n: int, size: int = 32) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(n)])


def test_saved_activations_grow_linearly_with_the_batch():
    model = build_model("cifar_small", 10)
    teacher = build_model("cifar_small", 10).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    config = TrainConfig()
    s2, s4, s8 = (saved_mb(model, teacher, x[:n], y[:n], config) for n in (2, 4, 8))
    assert s4 - s2 > 0 and math.isclose(s8 - s4, 2 * (s4 - s2), rel_tol=1e-6)


def test_a_frozen_front_saves_fewer_activations():
    model = build_model("cifar_small", 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    full, last = (saved_mb(model, None, x, y, TrainConfig(scope=scope)) for scope in ("full", "last"))
    assert last < full
    assert all(p.requires_grad for p in model.parameters())  # the scope is released


def test_the_peak_mark_resets_and_sees_an_allocation():
    """In a fresh interpreter: a long-lived test process may hold freed pages that a new block reuses
    without raising its resident size (the worker that profiles is a fresh process too)."""
    code = """
import torch
from prune_core.cost import PeakMeter
meter = PeakMeter(torch.device("cpu"))
meter.reset()
before = meter.peak_mb()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
assert meter.peak_mb() - before >= 60, (before, meter.peak_mb())
del block
meter.reset()
assert meter.peak_mb() < before + 60, (before, meter.peak_mb())
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_real_profile_predicts_a_positive_cost():
    model = build_model("cifar_small", 10).eval()
    train_set, held = _images(40), _images(12)
    p = profile(model, train_set, held, (0.5,) * 3, (0.25,) * 3, TrainConfig(), (2, 4), steps=3)
    assert [s.batch_size for s in p.samples] == [2, 4] and p.source is MemorySource.RSS
    assert p.memory.per_sample > 0 and p.model_mb > 0
    est = estimate(p, CyclePlan.of_retrain(TrainConfig(epochs=1, batch_size=8), 40, 12), 8)
    assert est.duration_s > 0 and est.peak_mb > p.model_mb


def test_a_profile_of_the_last_stages_counts_fewer_saved_activations():
    model = build_model("cifar_small", 10).eval()
    train_set, held = _images(40), _images(12)
    profiles = {scope: profile(model, train_set, held, (0.5,) * 3, (0.25,) * 3, TrainConfig(scope=scope), (4, 8), steps=2)
                for scope in ("full", "last")}
    assert profiles["last"].scope == "last"
    # at each batch size, the steps of the last stages keep fewer activations (exact byte counts)
    assert all(l.saved_mb < f.saved_mb for f, l in zip(profiles["full"].samples, profiles["last"].samples))
    assert all(p.requires_grad for p in model.parameters())
