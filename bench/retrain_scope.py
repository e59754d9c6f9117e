#!/usr/bin/env python
"""Partial vs full retraining (TrainConfig.scope): peak memory, time and accuracy of a cycle's retraining.

On the paper protocol's data (CIFAR-10 class subsets, bench/protocol): a 10-class base model (trained
once, or loaded from --out; or any saved model, --base, scored with --test-from on images it never
trained on), pruned once to --level with l1 (data-agnostic: the same pruned model for
every subset and scope, so the scopes differ in nothing else), then retrained on each subset with each
scope at the protocol's recipe (--epochs, --lr, no distillation on labelled samples, no augmentation)
and scored on the subset's held-out images. A scope is `full`, `last`, `last_bn` or `bias`;
`last:0.5` sets TrainConfig.last_share, `last:0.25:1` also TrainConfig.front_chunks (1: the frozen
front runs with the rest, at the whole batch, its batch norm in training mode, as before the split).

Memory: each retraining runs in a forked child that first returns the heap's free memory to the
system (malloc_trim) and resets its peak (/proc/self/clear_refs 5); the peak resident memory
(VmHWM) minus the resident memory before training is what retraining added: gradients, optimizer
state, activations, the best epoch's copy, the allocator's slack, and the pages of library code
(libtorch) the child maps in as it first runs them (a forked child does not inherit the parent's
mappings of them; resident, but clean, shared and reclaimable). The table's peak leaves those
out: VmHWM's growth minus RssFile's growth (file-backed pages are never unmapped during the run, so
this is a lower bound of the anonymous peak, and close to it); the VmHWM growth is in its own column. Time is the child's CPU time (one
thread): on cores shared with other jobs, wall time measures the neighbours as much as the scope. The process's own baseline
(torch, the data, the two models) is the same for every scope and not retraining's. Besides, one
training step's bytes are counted exactly: tensors saved for backward (parameters excluded), and
gradients plus momentum buffers (2 × the trainable parameters).

Writes results.csv (resumed) and results.md under --out. With --memory-only, no data and no
accuracy: an untrained network pruned to --level, --steps steps of random images per scope, for
memory and time at any input size (camera resolution, where activations outweigh parameters); a
step's time is the median between optimizer steps, the set-up (a split front's probe and
statistics pass, the first step's warm-up) the rest of the run.

    OMP_NUM_THREADS=1 python bench/retrain_scope.py --scopes full,last,last_bn,bias
    OMP_NUM_THREADS=1 python bench/retrain_scope.py --memory-only --network mobilenet_v2 --image-size 224 --batch-size 16
"""
from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from paper_protocol import csv_list
from label_shift import position_in_class
from protocol.data import (
    CIFAR_MEAN, CIFAR_STD, CLASSES, DEFAULT_CACHE, DEFAULT_DATA, REPO, Splits, load_splits, make_subsets, restrict, subset_name, unpack,
)
from protocol.progress import log
from protocol.runner import get_base, top1
from prune_core import ImageSet, TrainConfig, batches, build_model, count_params, load_image_folder, load_model, train
from prune_core.cost import PeakMeter
from prune_core.criteria import get_criterion
from prune_core.options import parse_scope
from prune_core.scope import Frozen, plan_scope
from prune_core.surgery import PruneSpec, prune_to_level

DEFAULT_OUT = REPO / "bench" / "out" / "retrain_scope"
FIELDS = ["variant", "subset", "subset_size", "accuracy", "seconds", "cpu_seconds", "steps", "peak_mb", "file_mb", "trainable_share", "front"]


def rss_file_mb() -> float:
    """The file-backed part of this process's resident memory (mapped library code and data), MiB."""
    return int(re.search(r"^RssFile:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def parse_variant(text: str) -> tuple[str, object, float, int]:
    """'last:0.5' → (text, RetrainScope.LAST, 0.5, 4): scope[:last_share[:front_chunks]], TrainConfig's defaults."""
    name, share, chunks, *rest = text.split(":") + ["", ""]
    try:
        if any(rest):
            raise ValueError(f"a variant is scope[:last_share[:front_chunks]], got {text!r}")
        return (text, parse_scope(name), float(share) if share else TrainConfig.last_share,
                int(chunks) if chunks else TrainConfig.front_chunks)
    except ValueError as exc:
        raise SystemExit(f"retrain_scope: {exc}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--scopes", default="full,last,last_bn,bias", help="comma-separated scope[:last_share[:front_chunks]]")
    p.add_argument("--level", type=float, default=0.5, help="share of the parameters l1 pruning removes")
    p.add_argument("--subset-sizes", default="2,3,5")
    p.add_argument("--subsets-per-size", type=int, default=2)
    p.add_argument("--per-class", type=int, default=500, help="images per class before the split")
    p.add_argument("--test-per-class", type=int, default=1000, help="score on the held-out images of this larger cap")
    p.add_argument("--base", help="load the 10-class base model from this directory (a saved model) instead of training one")
    p.add_argument("--test-from", type=int, default=None,
                   help="score on every image of each class from this index to --test-per-class instead of the held-out "
                        "split: for a --base that trained on the first ones")
    p.add_argument("--epochs", type=int, default=5, help="retraining epochs")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--base-epochs", type=int, default=12)
    p.add_argument("--base-lr", type=float, default=0.05)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-only", action="store_true", help="random images, no accuracy (see above)")
    p.add_argument("--steps", type=int, default=4, help="training steps per scope with --memory-only")
    args = p.parse_args(argv)
    args.subset_sizes = csv_list(args.subset_sizes, int)
    args.variants = [parse_variant(v) for v in csv_list(args.scopes, str)]
    return args


def _retrain_child(model, base, fit, val, test, config: TrainConfig, conn) -> None:
    """In a forked child: retrain `model`, send (accuracy, seconds, CPU seconds, steps, peak MiB added, library
    pages MiB mapped in, trainable share, how the front ran, median CPU seconds between optimizer steps)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        meter = PeakMeter(torch.device("cpu"))
        meter.reset()  # the peak mark drops to the current resident size
        before, file_before = meter.peak_mb(), rss_file_mb()
        t, cpu = time.monotonic(), time.process_time()
        stamps: list[float] = []
        result = train(model, fit, val, CIFAR_MEAN, CIFAR_STD, config, teacher=base, on_step=lambda _: stamps.append(time.process_time()))
        seconds, cpu = time.monotonic() - t, time.process_time() - cpu
        peak, file_mb = meter.peak_mb() - before, rss_file_mb() - file_before
        steps = sum(1 for _ in result.history) * -(-len(fit) // config.batch_size)
        conn.send((top1(model, test, torch.device("cpu"))[0], seconds, cpu, steps, peak, file_mb,
                   result.plan.to_dict()["trainable_share"], result.front,
                   statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else float("nan")))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(exc)
    finally:
        conn.close()
        os._exit(0)


def retrain_measured(model, base, fit, val, test, config: TrainConfig) -> tuple:
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_retrain_child, args=(model, base, fit, val, test, config, there))
    child.start()
    there.close()
    got = here.recv()
    child.join()
    if isinstance(got, BaseException):
        raise got
    return got


def step_bytes(model, scope, share: float, x: torch.Tensor) -> dict:
    """One training step's exact bytes: tensors saved for backward (not parameters) and gradients + momentum."""
    model = copy.deepcopy(model).train()
    frozen = Frozen(model, plan_scope(model, scope, share))
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        state = 2 * sum(p.numel() * p.element_size() for p in frozen.parameters())
    finally:
        frozen.release()
    del out
    return {"saved_mb": sum(seen.values()) / 2**20, "grad_state_mb": state / 2**20}


def anon_mb(row: dict) -> float:
    """What retraining added, less the library pages the child mapped in (see above)."""
    return float(row["peak_mb"]) - float(row["file_mb"])


def report(rows: list[dict], variants: list[str], steps: dict[str, dict]) -> str:
    full = {r["subset"]: r for r in rows if r["variant"] == "full"}
    lines = [
        "| scope | trainable params | top-1 | Δ vs full (mean / worst) | retraining peak MiB | × less | VmHWM growth MiB | CPU s per step | × faster |"
        " CPU s per retraining | saved for backward MiB | grads + momentum MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        n = len(mine)
        acc = sum(float(r["accuracy"]) for r in mine) / n
        peak = sum(anon_mb(r) for r in mine) / n
        hwm = sum(float(r["peak_mb"]) for r in mine) / n
        per_step = sum(float(r["cpu_seconds"]) / float(r["steps"]) for r in mine) / n
        paired = [r for r in mine if r["subset"] in full]
        delta = [float(r["accuracy"]) - float(full[r["subset"]]["accuracy"]) for r in paired]
        full_peak = sum(anon_mb(full[r["subset"]]) for r in paired) / max(1, len(paired))
        full_step = sum(float(full[r["subset"]]["cpu_seconds"]) / float(full[r["subset"]]["steps"]) for r in paired) / max(1, len(paired))
        s = steps.get(v, {})
        lines.append(
            f"| {v} | {100 * float(mine[0]['trainable_share']):.0f} % | {100 * acc:.1f} | "
            + (f"{100 * sum(delta) / len(delta):+.1f} / {100 * min(delta):+.1f}" if delta else "–")
            + f" | {peak:.0f} | {full_peak / peak:.1f} | {hwm:.0f} | {per_step:.3f} | {full_step / per_step:.1f} | "
            + f"{sum(float(r['cpu_seconds']) for r in mine) / n:.0f} | "
            + f"{s.get('saved_mb', float('nan')):.1f} | {s.get('grad_state_mb', float('nan')):.1f} |"
        )
    return "\n".join(lines) + f"\n\n{len(full)} subsets; Δ and the ratios are paired with full retraining on the same subset.\n"


def memory_only(args) -> str:
    """Memory and time of --steps training steps per scope on random images: no data set, no accuracy."""
    torch.manual_seed(args.seed)
    net = build_model(args.network, 10)
    criterion = get_criterion("l1")
    pruned = prune_to_level(net, criterion.score(net, None), PruneSpec(args.level), args.image_size, criterion.prefer_norm_layers).model
    n = args.batch_size * args.steps
    data = ImageSet(torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8),
                    torch.randint(0, 10, (n,)), [str(i) for i in range(n)])
    x = next(iter(batches(data, args.batch_size, CIFAR_MEAN, CIFAR_STD)))[0]
    lines = [f"{args.network} at {args.image_size} px, level {args.level} ({count_params(pruned)} parameters), batch {args.batch_size}",
             "", "| scope | trainable params | peak MiB | × less | VmHWM growth MiB | CPU s per step | × faster | CPU s set-up |"
             " saved for backward MiB | grads + momentum MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    reference = None
    for label, scope, share, chunks in args.variants:
        config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, seed=args.seed, distill_weight=0.0, augment=False,
                             scope=scope, last_share=share, front_chunks=chunks)
        _, _, cpu, steps, hwm, file_mb, trained, front, step = retrain_measured(copy.deepcopy(pruned), None, data, None, data.subset(range(2)), config)
        peak = hwm - file_mb
        b = step_bytes(pruned, scope, share, x)
        reference = reference or (peak, step)
        log(f"{label}: {front}")
        lines.append(f"| {label} | {100 * trained:.0f} % | {peak:.0f} | {reference[0] / peak:.1f} | {hwm:.0f} | {step:.2f} | "
                     f"{reference[1] / step:.1f} | {cpu - steps * step:.2f} | {b['saved_mb']:.1f} | {b['grad_state_mb']:.1f} |")
        log(lines[-1])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_only:
        print(memory_only(args))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    root = unpack(Path(args.data), Path(args.cache))
    splits = load_splits(root, args.image_size, args.per_class, 0.1, args.test_per_class)
    base_args = argparse.Namespace(base_epochs=args.base_epochs, batch_size=args.batch_size, base_lr=args.base_lr, seed=args.seed)
    if args.test_from is not None:
        every = load_image_folder(root, CLASSES, args.image_size, limit_per_class=args.test_per_class)
        splits = Splits(splits.fit, splits.val, every.subset(torch.nonzero(position_in_class(every.labels) >= args.test_from).flatten()))
    if args.base:
        base, _ = load_model(Path(args.base), cpu)
        log(f"base model loaded from {args.base} (top-1 {top1(base, splits.test, cpu)[0]:.4f} on the {len(splits.test)} scored images)")
    else:
        base, _ = get_base(args.network, args.image_size, splits, base_args, out / "models" / f"{args.network}-{args.image_size}", cpu)
    criterion = get_criterion("l1")
    pruned = prune_to_level(base, criterion.score(base, None), PruneSpec(args.level), args.image_size, criterion.prefer_norm_layers).model
    log(f"{args.network}@{args.image_size}: {count_params(base)} → {count_params(pruned)} parameters at level {args.level}")
    x = next(iter(batches(splits.fit, args.batch_size, CIFAR_MEAN, CIFAR_STD, shuffle=True, seed=args.seed)))[0]
    steps = {label: step_bytes(pruned, scope, share, x) for label, scope, share, _ in args.variants}

    path = out / "results.csv"
    done = {}
    if path.is_file():
        with open(path, newline="") as fh:
            done = {(r["variant"], r["subset"]): r for r in csv.DictReader(fh)}
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        if not done:
            writer.writeheader()
        for classes in make_subsets(args.subset_sizes, args.subsets_per_size, args.seed):
            name = subset_name(classes)
            fit, val, test = (restrict(s, classes) for s in (splits.fit, splits.val, splits.test))
            for label, scope, share, chunks in args.variants:
                if (label, name) in done:
                    continue
                config = TrainConfig(
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, distill_weight=0.0,
                    augment=False, scope=scope, last_share=share, front_chunks=chunks,
                )
                acc, seconds, cpu, n_steps, peak, file_mb, share_trained, front, _ = retrain_measured(copy.deepcopy(pruned), base, fit, val, test, config)
                row = dict(variant=label, subset=name, subset_size=len(classes), accuracy=f"{acc:.6f}", seconds=f"{seconds:.2f}", cpu_seconds=f"{cpu:.2f}",
                           steps=n_steps, peak_mb=f"{peak:.1f}", file_mb=f"{file_mb:.1f}", trainable_share=f"{share_trained:.4f}", front=front)
                writer.writerow(row)
                fh.flush()
                done[(label, name)] = row
                log(f"{name} {label}: top-1 {acc:.4f}, {seconds:.1f}s ({cpu:.1f}s CPU) for {n_steps} steps, peak +{peak - file_mb:.0f} MiB "
                    f"(VmHWM +{peak:.0f}); {front}")
    text = report(list(done.values()), [v[0] for v in args.variants], steps)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
