"""Predicted vs measured cost of a retraining run (prune_core.cost), per architecture × input size × batch size.

For each architecture and input size, one fresh process profiles a few training steps at the batch sizes
a cycle configured at the largest batch would profile (`profile_batches`), and predicts the peak memory
and duration of one `train()` run at each batch size of the sweep. Then, per batch size, another fresh
process (so its memory is clean) runs that `train()` for real and measures its peak memory (VmHWM,
reset just before, as the worker does) and its time. With `--mode worker` each cell is instead one
fresh process doing what the cycle worker does: profile, predict, reset the peak mark, run; with `--mode cycle`
the same for a whole `run_cycle` (profile_cycle: the model and a copy pruned at --level), with a second table
of each phase's predicted and measured seconds. Times are the process's CPU time, in the profile
and in the run alike: on cores shared with other jobs wall time measures the neighbours; with
OMP_NUM_THREADS=1 on an idle core the two are the same (the wall time is printed beside it). Data: synthetic uint8 images and labels,
distilling from a copy of the model, as a cycle does.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/cost_bench.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("cifar_small", "resnet18", "mobilenet_v2", "squeezenet1_1", "timm:regnetx_002")
SIZES = (32, 64)
BATCHES = (16, 32, 64)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _setup(arch: str, size: int, train_n: int, held_n: int, seed: int = 0):
    import torch

    from prune_core.architectures import build_model
    from prune_core.data import ImageSet

    torch.manual_seed(seed)
    model = build_model(arch, 10).eval()
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> ImageSet:
        return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(n)])

    return model, images(train_n), images(held_n)


def _config(batch: int, epochs: int):
    from prune_core.retrain import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch, min_steps=0)


def predict(arch: str, size: int, train_n: int, held_n: int, epochs: int, batches: list[int]) -> dict:
    from prune_core.cost import CyclePlan, estimate, profile, profile_batches

    model, train_set, held_set = _setup(arch, size, train_n, held_n)
    config = _config(max(batches), epochs)
    prof = profile(model, train_set, held_set, MEAN, STD, config, profile_batches(max(batches)), clock=time.process_time)
    plan = CyclePlan.of_retrain(config, train_n, held_n)
    return {"profile_batches": [s.batch_size for s in prof.samples], "profile_s": prof.seconds,
            "cells": {b: estimate(prof, plan, b).to_dict() for b in batches}}


def measure(arch: str, size: int, train_n: int, held_n: int, epochs: int, batch: int) -> dict:
    import copy

    import torch

    from prune_core.cost import PeakMeter
    from prune_core.retrain import train

    model, train_set, held_set = _setup(arch, size, train_n, held_n)
    student = copy.deepcopy(model)
    meter = PeakMeter(torch.device("cpu"))
    meter.reset()
    t0, wall = time.process_time(), time.perf_counter()
    train(student, train_set, held_set, MEAN, STD, _config(batch, epochs), teacher=model)
    return {"peak_mb": meter.peak_mb(), "duration_s": time.process_time() - t0, "wall_s": time.perf_counter() - wall}


def worker_cell(arch: str, size: int, train_n: int, held_n: int, epochs: int, batch: int, max_batch: int) -> dict:
    """The worker's sequence in one fresh process: profile, predict, reset the peak mark, run."""
    import copy

    import torch

    from prune_core.cost import CyclePlan, PeakMeter, estimate, profile, profile_batches
    from prune_core.retrain import train

    model, train_set, held_set = _setup(arch, size, train_n, held_n)
    prof = profile(model, train_set, held_set, MEAN, STD, _config(max_batch, epochs), profile_batches(max_batch), clock=time.process_time)
    config = _config(batch, epochs)
    est = estimate(prof, CyclePlan.of_retrain(config, train_n, held_n), batch)
    meter = PeakMeter(torch.device(prof.device))
    meter.reset()
    t0, wall = time.process_time(), time.perf_counter()
    train(copy.deepcopy(model), train_set, held_set, MEAN, STD, config, teacher=model)
    return {"estimate": est.to_dict(), "peak_mb": meter.peak_mb(), "duration_s": time.process_time() - t0, "wall_s": time.perf_counter() - wall}


def cycle_cell(arch: str, size: int, train_n: int, held_n: int, epochs: int, batch: int, level: str) -> dict:
    """A whole cycle (`run_cycle`: fine-tune 1 epoch, l1 ranking, prune to `level`, retrain) in one fresh
    process, as the worker runs it: profile (the model and a pruned copy), predict, reset the peak mark,
    run, with its phases timed on the same clock."""
    from dataclasses import asdict

    import torch

    from prune_core.cost import PeakMeter, plan_cycle, profile_cycle
    from prune_core.cost_records import PhaseClock, estimate, profile_batches
    from prune_core.cycle import CycleConfig, run_cycle
    from prune_core.model_format import ModelCard

    model, train_set, held_set = _setup(arch, size, train_n, held_n)
    config = CycleConfig(level=level if level == "auto" else float(level), criterion="l1", finetune_before=1,
                         train=_config(batch, epochs))
    profile_started = time.process_time()
    prof = profile_cycle(model, train_set, held_set, MEAN, STD, config, size, profile_batches(batch), clock=time.process_time)
    profile_s = time.process_time() - profile_started
    est = estimate(prof, plan_cycle(config, train_n, held_n), batch)
    card = ModelCard(arch=arch, num_classes=10, input_size=size, class_names=[str(i) for i in range(10)], mean=MEAN, std=STD)
    meter = PeakMeter(torch.device(prof.device))
    clock = PhaseClock(time.process_time)
    meter.reset()
    t0, wall = time.process_time(), time.perf_counter()
    result = run_cycle(model, card, train_set, held_set, config, clock=clock)
    return {"estimate": est.to_dict(), "peak_mb": meter.peak_mb(), "duration_s": time.process_time() - t0,
            "wall_s": time.perf_counter() - wall, "phases": asdict(clock.phases()), "profile_cpu_s": profile_s,
            "probes": len(result.summary["probes"]), "params_after": result.summary["params_after"]}


def _child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--train", type=int, default=384, help="training samples (one epoch)")
    p.add_argument("--held", type=int, default=128, help="held-out samples (evaluated before and after the epoch)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--level", default="0.5", help="--mode cycle: the cycle's pruning level (or auto)")
    p.add_argument("--mode", choices=("fresh", "worker", "cycle"), default="fresh",
                   help="fresh: predict in one process, run each batch size in another, clean one; worker: per cell one process"
                   " that profiles, predicts, resets the peak mark and runs, as the cycle worker does; cycle: the same for a"
                   " whole run_cycle (fine-tune 1 epoch, l1, level 0.5, retrain --epochs) instead of one train()")
    p.add_argument("--child", choices=("predict", "measure", "cell", "cycle"), help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.child == "predict":
        print(json.dumps(predict(a.arch, a.size, a.train, a.held, a.epochs, batches)))
        return
    if a.child == "cell":
        batch, max_batch = batches
        print(json.dumps(worker_cell(a.arch, a.size, a.train, a.held, a.epochs, batch, max_batch)))
        return
    if a.child == "cycle":
        print(json.dumps(cycle_cell(a.arch, a.size, a.train, a.held, a.epochs, batches[0], a.level)))
        return
    if a.child == "measure":
        print(json.dumps(measure(a.arch, a.size, a.train, a.held, a.epochs, batches[0])))
        return
    common = ["--train", str(a.train), "--held", str(a.held), "--epochs", str(a.epochs)]
    rows, cycles, started = [], [], time.monotonic()
    print(f"{'arch':18} {'px':>3} {'batch':>5} {'mem pred':>9} {'mem meas':>9} {'err':>7} {'s pred':>7} {'s meas':>7} {'err':>7} {'wall':>7}")
    for arch in a.archs.split(","):
        for size in (int(s) for s in a.sizes.split(",")):
            where = ["--arch", arch, "--size", str(size)]
            if a.mode == "fresh":
                pred = _child("--child", "predict", *where, "--batches", a.batches, *common)
            for b in batches:
                if a.mode == "fresh":
                    meas = _child("--child", "measure", *where, "--batches", str(b), *common)
                    est = pred["cells"][str(b)]
                elif a.mode == "worker":
                    meas = _child("--child", "cell", *where, "--batches", f"{b},{max(batches)}", *common)
                    est = meas["estimate"]
                else:
                    meas = _child("--child", "cycle", *where, "--batches", str(b), "--level", a.level, *common)
                    est = meas["estimate"]
                    cycles.append((f"{arch} {size} {b}", est, meas))
                mem_err = est["peak_mb"] / meas["peak_mb"] - 1
                dur_err = est["duration_s"] / meas["duration_s"] - 1
                rows.append((mem_err, dur_err))
                print(f"{arch:18} {size:3d} {b:5d} {est['peak_mb']:9.0f} {meas['peak_mb']:9.0f} {mem_err:+7.1%} "
                      f"{est['duration_s']:7.2f} {meas['duration_s']:7.2f} {dur_err:+7.1%} {meas['wall_s']:7.2f}", flush=True)
    mem_ok = sum(abs(m) <= 0.15 for m, _ in rows)
    dur_ok = sum(abs(d) <= 0.25 for _, d in rows)
    print(f"\n{len(rows)} cells: memory within 15 % in {mem_ok}, duration within 25 % in {dur_ok}; "
          f"mean |error| memory {sum(abs(m) for m, _ in rows) / len(rows):.1%}, duration {sum(abs(d) for _, d in rows) / len(rows):.1%}; "
          f"{time.monotonic() - started:.0f} s")
    if cycles:
        _phase_table(cycles)


PHASES = ("finetune", "ranking", "prune", "fade", "retrain", "validation")


def _phase_table(cycles: list) -> None:
    """Per cycle and phase: predicted / measured seconds; "other" is the measured time no phase claims
    (copies, parameter counts, the summary); the profile's own CPU seconds beside them."""
    print(f"\n{'cycle':26} " + " ".join(f"{p:>15}" for p in (*PHASES, "other")) + f" {'pruned params':>14} {'probes':>6} {'profile s':>9}")
    for name, est, meas in cycles:
        pred, got = est["phases"], meas["phases"]
        cells = [f"{pred[p]:6.2f}/{got[p]:<8.2f}" for p in PHASES] + [f"{'':6} {meas['duration_s'] - sum(got.values()):<8.2f}"]
        print(f"{name:26} " + " ".join(f"{c:>15}" for c in cells)
              + f" {est['pruned_params']:>7}/{meas['params_after']:<6} {meas['probes']:>6} {meas['profile_cpu_s']:9.2f}")


if __name__ == "__main__":
    main()
