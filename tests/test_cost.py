"""prune_core.cost: the extrapolation, the phase sums and the budget rule on a made-up profile (no
timing), and the measurements it rests on (saved activations, the peak-memory mark) on real models."""
from __future__ import annotations

import math
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prune_core.architectures import build_model
from prune_core.cost import plan_cycle, profile, profile_cycle, profile_level, saved_mb
from prune_core.cost_records import (
    CyclePlan, DoesNotFit, Line, MemorySource, Phase, PhaseClock, Phases, Profile, ProfileSample, estimate, fit_budget,
    profile_batches,
)
from prune_core.cycle import CycleConfig, run_cycle
from prune_core.measure import count_params
from prune_core.model_format import ModelCard
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
    assert est.phases.retrain == est.phases.prune == est.phases.ranking == est.phases.validation == 0
    assert est.phases.finetune == est.duration_s  # one train() of the unpruned model
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
    plan = plan_cycle(config, 160, 40, extra_models=2)
    assert (plan.probes, plan.tries, plan.forward_rankings, plan.backward_rankings) == (5, 4, 1, 1)
    assert plan.finetune_epochs == 3  # the ceiling is fine-tuned with the retraining budget
    assert (plan.extra_models, plan.pruned_copies, plan.auto) == (2 + 2, 1, True)  # base and the ceiling; the best so far
    p = fake_profile(prune_s=0.5, macs_s=0.25)
    est = estimate(p, plan, 16)
    step, run, held_pass = 0.1 + 0.01 * 16, 1.0 + 3 * 10 * (0.1 + 0.01 * 16), 40 * 0.001
    retrain = run + 5 * held_pass
    assert math.isclose(est.phases.retrain, 5 * 4 * retrain)  # no pruned profile: costed as the unpruned model
    assert math.isclose(est.phases.prune, 5 * 4 * (0.5 + 0.25) + 2 * 0.25)
    assert math.isclose(est.phases.validation, 3 * held_pass + (2 + 5 * 4) * held_pass)
    assert math.isclose(est.phases.ranking, 10 * (16 * 0.001 + step))
    # fine-tuning on labelled samples does not ask the teacher: its forward (an evaluation's per-image time) is left out
    assert math.isclose(est.phases.finetune, retrain - 3 * 10 * 16 * 0.001) and est.phases.fade == 0
    unlabelled = estimate(p, plan_cycle(config, 160, 40, extra_models=2, unlabelled=160), 16)
    assert math.isclose(unlabelled.phases.finetune, retrain)  # every batch has unlabelled rows: it asks every time
    assert est.phases.finetune < estimate(p, plan_cycle(config, 160, 40, unlabelled=8), 16).phases.finetune < retrain
    assert math.isclose(est.duration_s, est.phases.total)
    assert est.train_peak_mb == 500 + 2 * 16 + 7 + 4 * 10 + 10  # four more unpruned copies, one pruned
    assert "5 probes" in est.method
    fixed = plan_cycle(CycleConfig(level=0.5, criterion="l1"), 160, 40)
    assert (fixed.probes, fixed.tries, fixed.forward_rankings, fixed.finetune_epochs) == (1, 1, 0, 0)
    assert (fixed.extra_models, fixed.pruned_copies) == (1, 0)  # base
    assert plan_cycle(CycleConfig(level=0.5, finetune_before=1), 160, 40).extra_models == 2  # and the fine-tuned one


def pruned_profile(**kw) -> Profile:
    """A pruned copy of fake_profile's model: 200 MiB + 1 MiB per sample, a step 0.05 s + 0.005 s per sample,
    evaluation twice as fast, a quarter of the parameters."""
    samples = tuple(ProfileSample(b, 200 + b + 7, 0.05 + 0.005 * b, 3 + b, 1.0) for b in (8, 16))
    args = dict(samples=samples, eval_batch=256, eval_extra_mb=2.0, eval_image_s=0.0005, model_mb=2.5,
                source=MemorySource.RSS, device="cpu", seconds=1.0, params=250)
    return Profile(**{**args, **kw})


def test_the_probes_are_costed_at_the_pruned_copy():
    p = fake_profile(params=1000, pruned=pruned_profile(), level=0.75, prune_s=0.5)
    one = TrainConfig(epochs=1, batch_size=32, min_steps=0)
    plan = plan_cycle(CycleConfig(level=0.75, criterion="l1", train=one), 320, 100)
    est, unpruned = estimate(p, plan, 32), estimate(replace(p, pruned=None), plan, 32)
    assert (est.params, est.pruned_params, est.pruned_level) == (1000, 250, 0.75)
    run = 1.0 + 10 * (0.05 + 0.005 * 32) + 3 * 100 * 0.0005  # one epoch of 10 steps, judged
    assert math.isclose(est.phases.retrain, run)
    assert est.phases.retrain < unpruned.phases.retrain and est.phases.validation < unpruned.phases.validation
    assert est.phases.prune == unpruned.phases.prune == 0.5
    # the unpruned model never trains at a fixed level without fine-tuning: the pruned copy's line sets the peak
    assert est.train_peak_mb == 200 + 32 + 7 + 10 and est.train_peak_mb < unpruned.train_peak_mb
    tuned = estimate(p, plan_cycle(CycleConfig(level=0.75, finetune_before=1, train=one), 320, 100), 32)
    assert tuned.train_peak_mb == 500 + 2 * 32 + 7 + 2 * 10  # fine-tuning the unpruned model is the larger
    assert tuned.phases.finetune > est.phases.finetune == 0


def test_the_prunes_memory_counts_and_can_refuse_a_cycle():
    """The bisection's copies and the dependency graph: batch-independent, so no batch size helps."""
    one = TrainConfig(epochs=1, batch_size=32, min_steps=0)
    plan = plan_cycle(CycleConfig(level=0.5, criterion="l1", train=one), 320, 100)
    p = fake_profile(pruned=pruned_profile(), level=0.5, prune_extra_mb=300.0)
    est = estimate(p, plan, 32)
    assert est.prune_peak_mb == 200 + 32 + 7 + 300 + 10 == est.peak_mb  # on the heap the training left, with base
    assert estimate(replace(p, pruned=None), plan, 32).prune_peak_mb == 0  # not profiled: not counted
    assert fit_budget(p, plan, 64, 560).batch_size == 43  # 200 + b + 7 + 300 + 10 ≤ 560: the heap under it shrinks with the batch
    with pytest.raises(DoesNotFit, match=r"peak 519 MiB of the prune .* over cycle_memory_budget_mb=500"):
        fit_budget(p, plan, 64, 500)


def test_the_phase_clock_counts_each_phase_and_the_one_under_way():
    now = [0.0]
    clock = PhaseClock(lambda: now[0])
    with clock.timing(Phase.FINETUNE):
        now[0] += 3
        with clock.timing(Phase.VALIDATION):  # nested: the outer keeps counting
            now[0] += 1
    with pytest.raises(RuntimeError):
        with clock.timing(Phase.RETRAIN):
            now[0] += 2
            raise RuntimeError("aborted")
    with clock.timing(Phase.PRUNE):
        now[0] += 5
        clock.discount(1)  # paused
        assert clock.phases() == Phases(finetune=4, retrain=2, prune=4)
    assert clock.phases().total == 10


def test_profile_level_is_the_cycles_or_the_searchs_first_probe():
    assert profile_level(0.3) == 0.3 and profile_level("auto") == 0.5


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

def _card(size: int = 32) -> ModelCard:
    return ModelCard(arch="cifar_small", num_classes=10, input_size=size, class_names=[str(i) for i in range(10)],
                     mean=(0.5,) * 3, std=(0.25,) * 3)


def test_a_cycle_profile_prunes_a_throwaway_copy_and_costs_the_probes_at_it():
    model = build_model("cifar_small", 10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_set, held = _images(40), _images(12)
    config = CycleConfig(level=0.5, criterion="l1", finetune_before=1, train=TrainConfig(epochs=1, batch_size=8))
    p = profile_cycle(model, train_set, held, (0.5,) * 3, (0.25,) * 3, config, 32, (2, 4), steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher is not changed
    assert p.params == count_params(model) and p.pruned is not None and p.level == 0.5
    assert 0.3 * p.params < p.pruned.params < 0.7 * p.params  # about half the parameters removed
    assert p.pruned.model_mb < p.model_mb and p.prune_s > 0 and p.macs_s > 0 and p.pruned.memory.per_sample > 0
    assert p.prune_extra_mb >= 0
    est = estimate(p, plan_cycle(config, 40, 12), 8)
    assert est.pruned_params == p.pruned.params < est.params
    assert all(getattr(est.phases, f) >= 0 for f in ("finetune", "ranking", "prune", "fade", "retrain", "validation"))
    assert est.phases.finetune > 0 and est.phases.retrain > 0 and est.phases.prune > 0 and est.phases.fade == 0
    assert math.isclose(est.duration_s, est.phases.total)


def test_run_cycle_times_its_phases():
    model = build_model("cifar_small", 10).eval()
    clock = PhaseClock()
    config = CycleConfig(level=0.5, criterion="l1", finetune_before=1, train=TrainConfig(epochs=1, batch_size=8, min_steps=0))
    run_cycle(model, _card(), _images(24), _images(8), config, clock=clock)
    spent = clock.phases()
    assert spent.finetune > 0 and spent.prune > 0 and spent.retrain > 0 and spent.validation > 0 and spent.fade == 0


def test_a_cycle_stopped_midway_reports_the_phases_it_spent():
    model = build_model("cifar_small", 10).eval()
    clock = PhaseClock()
    config = CycleConfig(level=0.5, criterion="l1", finetune_before=1, train=TrainConfig(epochs=1, batch_size=8, min_steps=0))

    def stop(progress):
        raise KeyboardInterrupt  # what the worker's abort is: an exception out of a training step

    with pytest.raises(KeyboardInterrupt):
        run_cycle(model, _card(), _images(24), _images(8), config, should_continue=stop, clock=clock)
    spent = clock.phases()
    assert spent.validation > 0 and spent.finetune > 0  # evaluated, then stopped in the fine-tuning
    assert spent.prune == spent.retrain == 0
