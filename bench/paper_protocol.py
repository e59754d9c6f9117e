#!/usr/bin/env python
"""The seed paper's experiment (Rajagopal & Bouganis, ADaPT, arXiv 2006.08554) at small scale on CIFAR-10.

A model trained on all 10 classes is deployed on a device that only ever sees a few of them. We compare:

  none        the base model as deployed, evaluated on the device's classes;
  agnostic    data-agnostic pruning: l1-ranked, pruned to the level, retrained on the WHOLE 10-class training
              set (the device's data is unknown), `--epochs` epochs. It does not depend on the subset, so it is
              computed once per (network, level) and evaluated on every subset; trained with and without
              augmentation, the better on each subset's validation images is scored;
  adapt       the seed's data-aware recipe: fine-tune the unpruned model on the subset (n_f epochs), rank by l1,
              prune, retrain on the subset (n_r epochs), n_f + n_r = `--epochs`;
  activation, apoz, taylor
              the same recipe with a data-aware criterion ranking on the subset's images;
  ceiling     the unpruned base model fine-tuned on the subset for `--epochs` epochs, with and without
              augmentation; the one that scores better on the subset's validation images is kept;
  picked      (in the report, not a run) per subset, the data-aware run that scores best on the validation
              images: what run_cycle keeps with criterion "l1,activation,apoz,taylor" and the same n_f.

The data-aware methods train without crop/flip augmentation unless `--augment` (within a 6-epoch budget it
slows learning: bench/retrain_ablation.py), n_f = 1 by default.

Everything is evaluated on the subset's held-out images (10-way argmax; the classifier keeps all 10 outputs).
The held-out split is `split_holdout(data, 0.2)`; a further `--val-fraction` of the training part is set aside
(with a different salt) for the early stopping / best-epoch selection that `train` does, so no choice is made on
the images that are scored.

Writes to --out: results.csv (one row per network, level, subset, method; resumed on rerun: done rows are
skipped), results.md (printed to stdout too), accuracy_vs_level.png, config.json, and model directories for
the base models and the data-agnostic pruned models (so reruns skip them). Progress goes to stderr.

    python bench/paper_protocol.py --quick     # cifar_small, 2 subsets of 2 classes, levels 0.5/0.9, 300 images
                                               # per class, 2-epoch budget, 4-epoch base, one thread: 2.5-4 min on a busy 2-core CPU
    python bench/paper_protocol.py             # the full protocol: meant for a GPU (see the cost note below)

Cost of the full defaults, per network: ~36k training images; base 30 epochs (~1.1M images); agnostic 4 levels x
6 epochs (~0.9M); 30 subsets x 4 levels x 4 data-aware methods x 6 epochs on 3.6k images per class in the subset
(~35M) plus the ceilings (~2M): roughly 38M training-image passes (plus teacher forwards for distillation). On a
2-core CPU that is weeks for cifar_resnet18 (~25 img/s); shrink with --per-class, --subsets-per-size, --epochs.
Results are deterministic for a given seed, device and thread count.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prune_core import (
    ARCHS,
    CycleConfig,
    ImageSet,
    ModelCard,
    TrainConfig,
    adaptation,
    batches,
    build_model,
    count_macs,
    count_params,
    evaluate,
    load_image_folder,
    load_model,
    parse_allocations,
    pick_device,
    run_cycle,
    save_model,
    split_holdout,
    train,
)
from prune_core.argtypes import checked_by
from prune_core.model_format import ModelFormatError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
DEFAULT_OUT = REPO / "bench" / "out" / "paper_protocol"
QUICK_OUT = REPO / "bench" / "out" / "paper_protocol_quick"  # so a quick run never blocks resuming a full one
DEFAULT_CACHE = REPO / "bench" / "out" / "cache"

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
HOLDOUT = 0.2
VAL_SALT = "paper-protocol-val"
RECIPE = 6  # bumped when prune_core's cycle changes what a method does, so old results are not mixed in

METHODS = ("none", "ceiling", "agnostic", "adapt", "activation", "apoz", "taylor")
DATA_AWARE = ("adapt", "activation", "apoz", "taylor")
# not a run of its own: per subset, the data-aware run that scores best on the validation split (what a
# device that tries every criterion and keeps the winner would serve; it costs their four cycles)
PICKED = "picked"
PER_SUBSET_ONCE = ("none", "ceiling")  # do not depend on the level: computed once, one row per level
CSV_FIELDS = [
    "network", "level", "subset", "subset_size", "method", "criterion", "finetune_epochs", "retrain_epochs",
    "accuracy", "correct", "test_samples", "train_samples", "params", "macs", "level_achieved", "seconds", "reused",
    "augment", "val_accuracy",
]
BASELINE_AUGMENT = (True, False)  # the ceiling and agnostic runs are trained both ways; validation picks one per subset

QUICK = dict(
    networks="cifar_small", subset_sizes="2", subsets_per_size=2, levels="0.5,0.9",
    epochs=2, base_epochs=4, per_class=300, threads=1,
)
FULL = dict(
    networks="cifar_resnet18,cifar_mobilenet_v2,squeezenet1_1", subset_sizes="2,3,5", subsets_per_size=10,
    levels="0.3,0.5,0.7,0.9", epochs=6, base_epochs=30, per_class=None, threads=None,
)


def log(msg: str) -> None:
    print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments


def _csv_list(text: str, kind) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return [kind(t) for t in items]


def input_size(net: str, args: argparse.Namespace) -> int:
    """--image-size when given, else the network's own default."""
    return ARCHS[net].image_size if args.image_size is None else args.image_size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Reproduce the ADaPT paper's data-aware vs data-agnostic pruning experiment on CIFAR-10.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a 2.5-4 minute smoke run on a busy 2-core CPU (explicit flags still override its settings)")
    p.add_argument("--networks", help=f"comma-separated architectures (default {FULL['networks']})")
    p.add_argument("--subset-sizes", help=f"comma-separated class-subset sizes (default {FULL['subset_sizes']})")
    p.add_argument("--subsets-per-size", type=int, help=f"random subsets per size (default {FULL['subsets_per_size']})")
    p.add_argument("--levels", help=f"comma-separated pruning levels, fraction of parameters removed (default {FULL['levels']})")
    p.add_argument("--epochs", type=int, help=f"retraining budget of every method, n_f + n_r (default {FULL['epochs']})")
    p.add_argument("--finetune-epochs", type=int, help="n_f of the data-aware methods (default: 1 when epochs >= 2)")
    p.add_argument("--base-epochs", type=int, help=f"epochs of training the base models (default {FULL['base_epochs']})")
    p.add_argument("--per-class", type=int, help="cap on images per class before the split (default: all 5000)")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="score every method on the held-out images of this larger cap per class (a superset of "
                        "--per-class's held-out images, none of them trained on): the same training data, less noise")
    p.add_argument("--base-per-class", type=int, default=None,
                   help="cap per class of the whole dataset the base model and the data-agnostic baseline train on (the "
                        "paper's base model saw all of CIFAR-100's training images, its subsets are drawn from them; "
                        "default: --per-class). The split is by file name: its held-out images are never trained on either")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size of every network (default: each network's own, e.g. 32 for cifar_*, 64 for "
                        "torchvision's; the images are 32x32, so a larger size only upsamples them)")
    p.add_argument("--lr", type=float, default=0.03, help="peak learning rate of fine-tuning and retraining (every method and the ceiling)")
    p.add_argument("--allocation", type=checked_by(parse_allocations), default="uniform",
                   help="how the level is spread over layers, for every pruning method: uniform, global (by score per "
                        "parameter), or uniform,global (each run tries both and keeps the better on its validation split; "
                        "twice the retraining). Which wins depends on the network: README, 'Allocation on resnet18'")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="share of distillation from the unpruned model on labelled samples while retraining a pruned one "
                        "(0: cross-entropy alone; bench/retrain_ablation.py measured it)")
    p.add_argument("--augment", action="store_true",
                   help="crop/flip augmentation while the data-aware methods fine-tune and retrain (off without it: within "
                        "a 6-epoch budget it slows learning; bench/retrain_ablation.py measured it). The ceiling and "
                        "agnostic baselines are trained both ways and validation picks one per subset")
    p.add_argument("--base-lr", type=float, default=0.05, help="peak learning rate of base-model training")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training images used for early stopping")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 tarball of train/<class>/NNNN.jpg")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the tarball is unpacked (once)")
    p.add_argument("--out", help=f"output directory, resumed if it exists (default {DEFAULT_OUT.relative_to(REPO)}, "
                   f"or {QUICK_OUT.relative_to(REPO)} with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seeds the class subsets, initialisation and training order")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new row after this many minutes, then write the report of what is done (a device lease)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, or 1 with --quick: on a CPU that other jobs "
                        "use, two threads oversubscribe it and run several times slower than one)")
    args = p.parse_args(argv)

    preset = {**FULL, **(QUICK if args.quick else {}), "out": str(QUICK_OUT if args.quick else DEFAULT_OUT)}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.networks = _csv_list(args.networks, str)
        args.subset_sizes = _csv_list(args.subset_sizes, int)
        args.levels = _csv_list(args.levels, float)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        p.error(str(exc))
    for net in args.networks:
        if net not in ARCHS:
            p.error(f"unknown network '{net}'; choose from {', '.join(sorted(ARCHS))}")
        size, least = input_size(net, args), ARCHS[net].min_image_size
        if size < least:
            p.error(f"{net}: image size {size} is below its minimum {least}")
    if any(not 0 < lv < 1 for lv in args.levels):
        p.error("levels must be in (0, 1)")
    if any(not 1 <= k < len(CLASSES) for k in args.subset_sizes):
        p.error(f"subset sizes must be in [1, {len(CLASSES) - 1}]")
    if args.epochs < 1 or args.base_epochs < 1 or args.subsets_per_size < 1:
        p.error("--epochs, --base-epochs and --subsets-per-size must be at least 1")
    if args.per_class is not None and args.per_class < 10:
        p.error("--per-class must be at least 10")
    if args.test_per_class is not None and args.test_per_class < (args.per_class or 5000):
        p.error("--test-per-class must be at least --per-class (a larger cap's held-out images)")
    if args.base_per_class is not None and args.base_per_class < (args.per_class or 5000):
        p.error("--base-per-class must be at least --per-class (the subsets' images are part of the whole dataset)")
    if not 0 <= args.distill_weight <= 1:
        p.error("--distill-weight must be in [0, 1]")
    if not 0 < args.val_fraction < 0.5:
        p.error("--val-fraction must be in (0, 0.5)")
    if args.finetune_epochs is None:
        args.finetune_epochs = 1 if args.epochs >= 2 else 0
    if not 0 <= args.finetune_epochs < args.epochs:
        p.error("--finetune-epochs must be in [0, epochs): the data-aware methods need at least one retraining epoch")
    args.levels = sorted(set(args.levels))
    return args


# --------------------------------------------------------------------------- data


def unpack(tarball: Path, cache: Path) -> Path:
    """Unpack the tarball once into `cache` (atomically: a partial unpack is never reused); the ImageFolder root."""
    if not tarball.is_file():
        raise SystemExit(f"paper_protocol: data tarball '{tarball}' not found (use --data)")
    st = tarball.stat()
    dest = cache / f"{tarball.name.split('.')[0]}-{st.st_size}"
    if not (dest / ".complete").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"unpacking {tarball} into {dest}")
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
        try:
            with tarfile.open(tarball) as tf:
                try:
                    tf.extractall(tmp, filter="data")
                except TypeError:  # Python without extraction filters
                    tf.extractall(tmp)
            (tmp / ".complete").touch()
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        except OSError:
            if not (dest / ".complete").is_file():  # a concurrent run did not win the race either
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    roots = [d for d in [dest / "train", dest] if d.is_dir() and all((d / c).is_dir() for c in CLASSES)]
    if not roots:
        raise SystemExit(f"paper_protocol: {tarball} does not hold train/<class>/ folders for the CIFAR-10 classes")
    return roots[0]


@dataclass
class Splits:
    fit: ImageSet  # training images
    val: ImageSet  # early stopping / best-epoch selection
    test: ImageSet  # held-out images everything is scored on


def load_splits(root: Path, size: int, per_class: int | None, val_fraction: float, test_per_class: int | None = None) -> Splits:
    """Train/validation/held-out splits of the first `per_class` images of each class. With `test_per_class`, the
    held-out images are those of a larger cap: the split is by file name, so they are a superset of the small cap's
    held-out images and hold none of its training images (less noise in each score, the same training data)."""
    data = load_image_folder(root, CLASSES, size, limit_per_class=per_class)
    trainval, test = split_holdout(data, HOLDOUT)
    fit, val = split_holdout(trainval, val_fraction, salt=VAL_SALT)
    if test_per_class is not None:
        _, test = split_holdout(load_image_folder(root, CLASSES, size, limit_per_class=test_per_class), HOLDOUT)
    return Splits(fit, val, test)


def restrict(data: ImageSet, classes: tuple[int, ...]) -> ImageSet:
    keep = torch.isin(data.labels, torch.tensor(classes, dtype=torch.long))
    return data.subset(torch.nonzero(keep).flatten())


def make_subsets(sizes: list[int], per_size: int, seed: int) -> list[tuple[int, ...]]:
    """Distinct random class subsets; the first m of a size are the same whatever `per_size` is."""
    subsets = []
    for k in sizes:
        rng = random.Random(f"{seed}:{k}")
        want = min(per_size, math.comb(len(CLASSES), k))
        chosen: list[tuple[int, ...]] = []
        while len(chosen) < want:
            c = tuple(sorted(rng.sample(range(len(CLASSES)), k)))
            if c not in chosen:
                chosen.append(c)
        subsets += chosen
    return subsets


def subset_name(classes: tuple[int, ...]) -> str:
    return "+".join(CLASSES[i] for i in classes)


# --------------------------------------------------------------------------- results file


def level_key(level: float) -> str:
    return f"{level:.2f}"


class Results:
    """results.csv, appended and flushed row by row; rows already there are skipped on rerun."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, str, str], dict] = {}
        if path.is_file():
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    try:
                        float(row["accuracy"])
                        float(row["seconds"])
                    except (TypeError, ValueError, KeyError):
                        continue  # a torn last line from an interrupted run
                    self.rows[self.key(row)] = row
        # rewrite cleanly (drops a torn line), then append
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows.values())
        os.replace(tmp, path)
        self._fh = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, CSV_FIELDS, extrasaction="ignore")

    @staticmethod
    def key(row: dict) -> tuple[str, str, str, str]:
        return (row["network"], row["level"], row["subset"], row["method"])

    def has(self, network: str, level: float, subset: str, method: str) -> bool:
        return (network, level_key(level), subset, method) in self.rows

    def any_level(self, network: str, subset: str, method: str) -> dict | None:
        for (n, _, s, m), row in self.rows.items():
            if (n, s, m) == (network, subset, method):
                return row
        return None

    def add(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in CSV_FIELDS}
        row = {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in row.items()}
        self.rows[self.key(row)] = row
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def check_config(out: Path, config: dict) -> None:
    """An output directory holds the results of one configuration; refuse to mix another into it."""
    path = out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise SystemExit(
                f"paper_protocol: {out} holds results of another configuration (differs in: {', '.join(diff)}); "
                "use another --out or delete it"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- the protocol


class OutOfTime(Exception):
    """--max-minutes has passed: no new row is started; the report covers the rows done."""


class Progress:
    def __init__(self, total: int, max_minutes: float | None = None):
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.deadline = self.started + 60 * max_minutes if max_minutes else None

    def step(self, what: str) -> None:
        self.done += 1
        spent = time.monotonic() - self.started
        eta = spent / self.done * (self.total - self.done) if self.done else 0.0
        log(f"[{self.done}/{self.total}] {what}  (elapsed {spent / 60:.1f} min, eta {eta / 60:.1f} min)")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(f"--max-minutes reached after {self.done} of {self.total} rows; rerun with the same --out to resume")


def top1(model, data: ImageSet, device) -> tuple[float, int]:
    acc = evaluate(model, batches(data, 256, CIFAR_MEAN, CIFAR_STD, device=device))
    return acc.top1, acc.correct


def run_protocol(args: argparse.Namespace) -> Path:
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    out = Path(args.out)
    tarball = Path(args.data)
    n_f, n_r = args.finetune_epochs, args.epochs - args.finetune_epochs
    config = {
        "data": tarball.name, "data_bytes": tarball.stat().st_size if tarball.is_file() else None,
        "per_class": args.per_class, "test_per_class": args.test_per_class,
        **({"base_per_class": args.base_per_class} if args.base_per_class else {}),
        **({"image_size": args.image_size} if args.image_size else {}), "holdout": HOLDOUT, "val_fraction": args.val_fraction,
        "epochs": args.epochs, "finetune_epochs": n_f, "base_epochs": args.base_epochs,
        "lr": args.lr, "base_lr": args.base_lr, "batch_size": args.batch_size, "seed": args.seed,
        "allocation": args.allocation, "distill_weight": args.distill_weight, "augment": args.augment, "recipe": RECIPE,
    }
    root = unpack(tarball, Path(args.cache))
    check_config(out, config)
    results = Results(out / "results.csv")
    subsets = make_subsets(args.subset_sizes, args.subsets_per_size, args.seed)
    log(f"device {device}; networks {args.networks}; levels {args.levels}; {len(subsets)} subsets of "
        f"{args.subset_sizes} classes; budget {args.epochs} epochs (data-aware: n_f={n_f} + n_r={n_r}); "
        f"base {args.base_epochs} epochs; per class {args.per_class or 'all'}; out {out}")

    def retrain_cfg(epochs: int, augment: bool = args.augment) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, distill_weight=args.distill_weight, augment=augment,
        )

    # work still to do, for the progress line
    todo = 0
    for net in args.networks:
        for sub in map(subset_name, subsets):
            todo += sum(results.any_level(net, sub, m) is None for m in PER_SUBSET_ONCE)
            for lv in args.levels:
                todo += sum(not results.has(net, lv, sub, m) for m in ("agnostic",) + DATA_AWARE)
    progress = Progress(todo, args.max_minutes)
    if todo == 0:
        log("every row is already in results.csv; writing the report")

    try:
        for net in args.networks:
            run_network(net, args, results, subsets, progress, root, out, device, n_f, n_r, retrain_cfg)
    except OutOfTime as stop:
        log(str(stop))
    finally:
        results.close()
    return out


def run_network(net, args, results, subsets, progress, root, out, device, n_f, n_r, retrain_cfg) -> None:
    """Every missing row of one network: its base model, the per-subset baselines, agnostic and data-aware runs."""
    names = list(map(subset_name, subsets))
    if not any(
        results.any_level(net, s, m) is None or not all(results.has(net, lv, s, m) for lv in args.levels)
        for s in names for m in METHODS
    ):
        return
    size = input_size(net, args)
    t0 = time.monotonic()
    splits = load_splits(root, size, args.per_class, args.val_fraction, args.test_per_class)
    log(f"{net}: {len(splits.fit)} training, {len(splits.val)} validation, {len(splits.test)} held-out images "
        f"at {size}x{size} ({time.monotonic() - t0:.1f}s)")
    whole = splits  # what the base model and the data-agnostic baseline train on
    if args.base_per_class:
        whole = load_splits(root, size, args.base_per_class, args.val_fraction)
        log(f"{net}: base model and data-agnostic baseline on {len(whole.fit)} training, {len(whole.val)} validation images")
    base, card = get_base(net, size, whole, args, out / "models" / net / "base", device)
    base_params, base_macs = count_params(base), count_macs(base, size)

    per_subset = {}
    for classes in subsets:
        per_subset[classes] = (restrict(splits.fit, classes), restrict(splits.val, classes), restrict(splits.test, classes))

    def row(level, classes, method, model_acc, params, macs, seconds, reused, **extra) -> dict:
        acc, correct = model_acc
        return dict(
            network=net, level=level_key(level), subset=subset_name(classes), subset_size=len(classes),
            method=method, accuracy=acc, correct=correct, test_samples=len(per_subset[classes][2]),
            params=params, macs=macs, seconds=seconds, reused=int(reused), **extra,
        )

    # none and ceiling: independent of the level
    for classes in subsets:
        fit, val, test = per_subset[classes]
        name = subset_name(classes)
        for method in PER_SUBSET_ONCE:
            prior = results.any_level(net, name, method)
            if prior is None:
                t = time.monotonic()
                if method == "none":
                    acc, extra = top1(base, test, device), dict(criterion="", finetune_epochs=0, retrain_epochs=0, train_samples=0)
                else:
                    acc, augment, val_acc = ceiling(base, fit, val, test, lambda aug: retrain_cfg(args.epochs, aug), device)
                    extra = dict(
                        criterion="", finetune_epochs=args.epochs, retrain_epochs=0, train_samples=len(fit), augment=augment,
                        val_accuracy=val_acc,
                    )
                seconds = time.monotonic() - t
                for i, lv in enumerate(args.levels):
                    results.add(row(lv, classes, method, acc, base_params, base_macs, seconds, i > 0, level_achieved=0.0, **extra))
                progress.step(f"{net} {name} {method}: top1 {acc[0]:.4f} ({seconds:.1f}s)")
            else:  # known from another level
                for lv in args.levels:
                    if not results.has(net, lv, name, method):
                        results.add({**prior, "level": level_key(lv), "reused": 1})

    for level in args.levels:
        # data-agnostic: once per (network, level), on all 10 classes; evaluated on every subset
        missing = [c for c in subsets if not results.has(net, level, subset_name(c), "agnostic")]
        if missing:
            runs = {aug: agnostic_model(net, level, aug, base, card, whole, args, out, device, retrain_cfg) for aug in BASELINE_AUGMENT}
            sizes = {aug: (count_params(model), count_macs(model, size)) for aug, (model, _, _) in runs.items()}
            for i, classes in enumerate(missing):
                _, val, test = per_subset[classes]
                acc, augment, val_acc = pick_on_validation({aug: run[0] for aug, run in runs.items()}, val, test, device)
                (_, seconds, loaded), (params, macs) = runs[augment], sizes[augment]
                results.add(row(
                    level, classes, "agnostic", acc, params, macs, seconds,
                    i > 0 or (loaded and len(missing) < len(subsets)),
                    criterion="l1", finetune_epochs=0, retrain_epochs=args.epochs, train_samples=len(whole.fit),
                    level_achieved=1 - params / base_params, augment=int(augment), val_accuracy=val_acc,
                ))
                progress.step(f"{net} level {level_key(level)} {subset_name(classes)} agnostic: top1 {acc[0]:.4f}"
                              + (f" ({seconds:.1f}s, shared by all subsets)" if i == 0 else ""))

    # data-aware: on each subset's own images, same total budget. The n_f epochs of adapting the
    # unpruned model do not depend on the level or the criterion, so they run once per subset and
    # every method starts from the adapted model (what run_cycle's finetune_before would redo each
    # time, with identical results); each row's seconds include that shared cost.
    for classes in subsets:
        fit, val, test = per_subset[classes]
        name = subset_name(classes)
        todo = [(lv, m) for lv in args.levels for m in DATA_AWARE if not results.has(net, lv, name, m)]
        if not todo:
            continue
        t = time.monotonic()
        adapted = copy.deepcopy(base)
        train(adapted, fit, val, CIFAR_MEAN, CIFAR_STD, adaptation(retrain_cfg(n_r), n_f), teacher=base)
        adapt_seconds = time.monotonic() - t
        for level, method in todo:
            criterion = "l1" if method == "adapt" else method
            t = time.monotonic()
            cfg = CycleConfig(level=level, criterion=criterion, allocation=args.allocation, train=retrain_cfg(n_r))
            result = run_cycle(adapted, card, fit, val, cfg)
            acc = top1(result.model, test, device)
            seconds = time.monotonic() - t + adapt_seconds
            s = result.summary
            results.add(row(
                level, classes, method, acc, s["params_after"], s["macs_after"], seconds, False,
                criterion=criterion, finetune_epochs=n_f, retrain_epochs=n_r, train_samples=len(fit),
                level_achieved=s["level_achieved"], augment=int(args.augment), val_accuracy=s["top1_after"],
            ))
            progress.step(f"{net} level {level_key(level)} {name} {method}: top1 {acc[0]:.4f} ({seconds:.1f}s)")


def pick_on_validation(
    models: dict[bool, torch.nn.Module], val: ImageSet, test: ImageSet, device,
) -> tuple[tuple[float, int], int, float]:
    """((top-1, correct) on `test`, augment, top-1 on `val`) of the model, keyed by its augmentation setting, that
    scores best on `val`: the choice never sees the scored images (ties go to the first key)."""
    scores = {aug: top1(model, val, device)[0] for aug, model in models.items()}
    augment = max(scores, key=scores.get)
    return top1(models[augment], test, device), int(augment), scores[augment]


def ceiling(base, fit: ImageSet, val: ImageSet, test: ImageSet, config_for, device) -> tuple[tuple[float, int], int, float]:
    """((top-1, correct) on `test`, augment used, top-1 on `val`) of the base model fine-tuned on the subset with the whole budget,
    `config_for(augment)`, with and without augmentation; validation picks one."""
    models = {}
    for augment in BASELINE_AUGMENT:
        models[augment] = copy.deepcopy(base)
        config = config_for(augment)
        train(models[augment], fit, val, CIFAR_MEAN, CIFAR_STD, adaptation(config, config.epochs), teacher=base)
    return pick_on_validation(models, val, test, device)


def agnostic_model(net, level, augment, base, card, splits, args, out, device, retrain_cfg):
    """(model, seconds, loaded): data-agnostic l1 pruning of the base model retrained on all classes, once per
    (network, level, augmentation setting); loaded from its model directory when an earlier run saved it."""
    model_dir = out / "models" / net / f"agnostic-{level_key(level)}{'' if augment else '-noaug'}"
    try:
        model, _ = load_model(model_dir, device)
        seconds = float(json.loads((model_dir / "seconds.json").read_text())["seconds"])
        log(f"{net} level {level_key(level)} agnostic (augment={augment}): loaded from {model_dir}")
        return model, seconds, True
    except (ModelFormatError, OSError, KeyError, ValueError):
        pass
    t = time.monotonic()
    cfg = CycleConfig(level=level, criterion="l1", allocation=args.allocation, train=retrain_cfg(args.epochs, augment))
    result = run_cycle(base, card, splits.fit, splits.val, cfg)
    seconds = time.monotonic() - t
    save_model(result.model, result.card, model_dir)
    (model_dir / "seconds.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    return result.model, seconds, False


def get_base(net: str, size: int, splits: Splits, args, model_dir: Path, device):
    """The 10-class base model: loaded from `model_dir`, or trained from scratch and saved there."""
    try:
        model, card = load_model(model_dir, device)
        log(f"{net}: base model loaded from {model_dir} (held-out top1 {top1(model, splits.test, device)[0]:.4f})")
        return model, card
    except ModelFormatError:
        pass
    t = time.monotonic()
    torch.manual_seed(args.seed)
    model = build_model(net, len(CLASSES)).to(device)
    card = ModelCard(net, len(CLASSES), list(CLASSES), size, mean=CIFAR_MEAN, std=CIFAR_STD)
    log(f"{net}: training the base model, {args.base_epochs} epochs on {len(splits.fit)} images")
    cfg = TrainConfig(
        epochs=args.base_epochs, batch_size=args.batch_size, lr=args.base_lr, seed=args.seed,
        patience=max(3, args.base_epochs // 4),
    )
    history = train(model, splits.fit, splits.val, CIFAR_MEAN, CIFAR_STD, cfg)
    save_model(model, card, model_dir)
    model, card = load_model(model_dir, device)
    log(f"{net}: base model trained in {time.monotonic() - t:.0f}s (best epoch {history.best_epoch}, validation "
        f"top1 {history.best_score:.4f}, held-out top1 {top1(model, splits.test, device)[0]:.4f}); saved to {model_dir}")
    return model, card


# --------------------------------------------------------------------------- report


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}"


def _pts(x: float) -> str:
    return "–" if x != x else f"{100 * x:+.1f}"


def summarise(rows: list[dict]) -> dict:
    """{(network, level): {method: {subset: accuracy}}} plus subset sizes; method PICKED where every data-aware
    run of a subset recorded its validation score."""
    table: dict[tuple[str, float], dict[str, dict[str, float]]] = {}
    sizes: dict[str, int] = {}
    val: dict[tuple[str, float, str], dict[str, float]] = {}
    for r in rows:
        key = (r["network"], float(r["level"]))
        table.setdefault(key, {}).setdefault(r["method"], {})[r["subset"]] = float(r["accuracy"])
        sizes[r["subset"]] = int(r["subset_size"])
        if r["method"] in DATA_AWARE and r.get("val_accuracy"):
            val.setdefault((*key, r["subset"]), {})[r["method"]] = float(r["val_accuracy"])
    for (net, level, subset), scores in val.items():
        if len(scores) == len(DATA_AWARE):
            winner = max(DATA_AWARE, key=lambda m: scores[m])  # ties go to the first in DATA_AWARE
            table[(net, level)].setdefault(PICKED, {})[subset] = table[(net, level)][winner][subset]
    return {"table": {key: complete(cell) for key, cell in table.items()}, "sizes": sizes}


def complete(cell: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The cell restricted to the subsets that have every method (all of them when none has), so that
    every column of a row averages over the same subsets."""
    names = set().union(*(set(v) for v in cell.values())) if cell else set()
    full = {s for s in names if all(s in cell.get(m, {}) for m in METHODS)}
    if not full:
        return cell
    return {m: {s: a for s, a in accs.items() if s in full} for m, accs in cell.items()}


def best_data_aware(cell: dict[str, dict[str, float]], subsets: list[str] | None = None) -> str | None:
    """The data-aware method (or PICKED) with the highest mean accuracy over the subsets it was run on."""
    scored = []
    for i, m in enumerate(DATA_AWARE + (PICKED,)):
        accs = [a for s, a in cell.get(m, {}).items() if subsets is None or s in subsets]
        if accs:
            scored.append((_mean(accs), -i, m))
    return max(scored)[2] if scored else None


def gains(cell, method: str, subsets: list[str] | None = None) -> tuple[list[float], list[float]]:
    """Per subset: (best − agnostic) and (ceiling − best), over subsets that have both."""
    got = {s: a for s, a in cell.get(method, {}).items() if subsets is None or s in subsets}
    gain = [a - cell["agnostic"][s] for s, a in got.items() if s in cell.get("agnostic", {})]
    gap = [cell["ceiling"][s] - a for s, a in got.items() if s in cell.get("ceiling", {})]
    return gain, gap


def write_report(out: Path, args, config_line: str) -> str:
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    info = summarise(rows)
    table, sizes = info["table"], info["sizes"]
    lines = [
        "# ADaPT protocol (arXiv 2006.08554) on CIFAR-10, small scale",
        "",
        config_line,
        "",
        "Top-1 (%) on each class subset's held-out images, mean over subsets. *best* is the data-aware method "
        "(adapt, activation, apoz, taylor) with the highest mean at that network and level; *gain* is best − agnostic "
        "in accuracy points per subset (mean and max over subsets); *to ceiling* is the mean of ceiling − best. "
        f"*{PICKED}* is, per subset, the data-aware run with the best top-1 on the validation split (never on the "
        "held-out images), as a device that tried all four would keep (the ceiling and agnostic rows are picked the same "
        "way between their two augmentation settings). Each row averages over the subsets that have every method.",
        "",
        f"| network | level | subsets | none | ceiling | agnostic | adapt | activation | apoz | taylor | {PICKED} | best | gain mean | gain max | to ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (net, level), cell in sorted(table.items()):
        best = best_data_aware(cell)
        gain, gap = gains(cell, best) if best else ([], [])
        n = len(cell.get("agnostic", cell.get("none", {})))
        accs = [_pct(_mean(list(cell.get(m, {}).values()))) for m in METHODS + (PICKED,)]
        lines.append(
            f"| {net} | {level:.2f} | {n} | " + " | ".join(accs)
            + f" | {best or '–'} | {_pts(_mean(gain))} | {_pts(max(gain) if gain else float('nan'))} | {_pts(_mean(gap))} |"
        )
    by_size = sorted(set(sizes.values()))
    if len(by_size) > 1:
        lines += [
            "",
            "By subset size (same definitions, best chosen per size):",
            "",
            "| network | level | classes | subsets | agnostic | best | best acc | gain mean | gain max | to ceiling |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (net, level), cell in sorted(table.items()):
            for k in by_size:
                subs = [s for s, kk in sizes.items() if kk == k]
                best = best_data_aware(cell, subs)
                if best is None:
                    continue
                gain, gap = gains(cell, best, subs)
                agn = [a for s, a in cell.get("agnostic", {}).items() if s in subs]
                bacc = [a for s, a in cell[best].items() if s in subs]
                lines.append(
                    f"| {net} | {level:.2f} | {k} | {len(bacc)} | {_pct(_mean(agn))} | {best} | {_pct(_mean(bacc))} | "
                    f"{_pts(_mean(gain))} | {_pts(max(gain) if gain else float('nan'))} | {_pts(_mean(gap))} |"
                )
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "results.csv", newline="") as fh:
        table = summarise(list(csv.DictReader(fh)))["table"]
    networks = sorted({net for net, _ in table})
    fig, axes = plt.subplots(1, len(networks), figsize=(max(6.5, 5.2 * len(networks)), 4.4), squeeze=False)
    styles = {
        "none": dict(color="grey", linestyle=":", marker=None),
        "ceiling": dict(color="black", linestyle="--", marker=None),
        "agnostic": dict(color="tab:red", linestyle="-", marker="s"),
        "adapt": dict(color="tab:blue", linestyle="-", marker="o"),
        "activation": dict(color="tab:green", linestyle="-", marker="^"),
        "apoz": dict(color="tab:orange", linestyle="-", marker="v"),
        "taylor": dict(color="tab:purple", linestyle="-", marker="D"),
        PICKED: dict(color="tab:cyan", linestyle="-.", marker="*"),
    }
    for ax, net in zip(axes[0], networks):
        levels = sorted(lv for n, lv in table if n == net)
        for method in METHODS + (PICKED,):
            pts = [(lv, _mean(list(table[(net, lv)][method].values()))) for lv in levels if table[(net, lv)].get(method)]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=method, **styles[method])
        ax.set_title(net)
        ax.set_xlabel("pruning level (fraction of parameters removed)")
        ax.set_ylabel("top-1 on the subset's held-out images (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Data-aware vs data-agnostic pruning (mean over class subsets)", fontsize=11)
    fig.tight_layout()
    path = out / "accuracy_vs_level.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run_protocol(args)
    n_f = args.finetune_epochs
    config_line = (
        f"Budget {args.epochs} epochs per method (data-aware: fine-tune n_f={n_f} + retrain n_r={args.epochs - n_f}); "
        f"base models {args.base_epochs} epochs; {args.per_class or 'all'} images per class before the 80/20 split"
        f"{f' (scored on the held-out images of the first {args.test_per_class})' if args.test_per_class else ''}"
        f"{f', base model and agnostic baseline on the first {args.base_per_class}' if args.base_per_class else ''}"
        f"{f'; input {args.image_size}x{args.image_size}' if args.image_size else ''}; "
        f"peak lr {args.lr}; {args.allocation} allocation; distillation weight {args.distill_weight}; data-aware methods "
        f"{'with' if args.augment else 'without'} augmentation, ceiling and agnostic with or without, as validation picks; seed {args.seed}."
    )
    report = write_report(out, args, config_line)
    png = plot(out)
    print(report)
    log(f"done in {time.monotonic() - started:.0f}s: {out / 'results.csv'}, {out / 'results.md'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
