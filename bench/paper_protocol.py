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
                                               # per class, 2-epoch budget, 4-epoch base, one thread: a few minutes on a CPU
    python bench/paper_protocol.py             # the full protocol: meant for a GPU (see the cost note below)

Cost of the full defaults, per network: ~36k training images; base 30 epochs (~1.1M images); agnostic 4 levels x
6 epochs (~0.9M); 30 subsets x 4 levels x 4 data-aware methods x 6 epochs on 3.6k images per class in the subset
(~35M) plus the ceilings (~2M): roughly 38M training-image passes (plus teacher forwards for distillation), far
too many for a small CPU; shrink with --per-class, --subsets-per-size, --epochs. Measured run times are in
bench/RESULTS.md. Results are deterministic for a given seed, device and thread count.

The protocol itself lives in bench/protocol/ (data, results, runner, report); this is its command line.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from prune_core import ARCHS, parse_allocations
from prune_core.argtypes import checked_by
from protocol.data import CLASSES, DEFAULT_CACHE, DEFAULT_DATA, REPO
from protocol.progress import log
from protocol.report import config_line, plot, write_report
from protocol.runner import input_size, run_protocol

DEFAULT_OUT = REPO / "bench" / "out" / "paper_protocol"
QUICK_OUT = REPO / "bench" / "out" / "paper_protocol_quick"  # so a quick run never blocks resuming a full one

QUICK = dict(
    networks="cifar_small", subset_sizes="2", subsets_per_size=2, levels="0.5,0.9",
    epochs=2, base_epochs=4, per_class=300, threads=1,
)
FULL = dict(
    networks="cifar_resnet18,cifar_mobilenet_v2,squeezenet1_1", subset_sizes="2,3,5", subsets_per_size=10,
    levels="0.3,0.5,0.7,0.9", epochs=6, base_epochs=30, per_class=None, threads=None,
)


def csv_list(text: str, kind) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return [kind(t) for t in items]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Reproduce the ADaPT paper's data-aware vs data-agnostic pruning experiment on CIFAR-10.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few minutes on a CPU (explicit flags still override its settings)")
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
                        "twice the retraining). Which wins depends on the network: bench/RESULTS.md")
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
        args.networks = csv_list(args.networks, str)
        args.subset_sizes = csv_list(args.subset_sizes, int)
        args.levels = csv_list(args.levels, float)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run_protocol(args)
    report = write_report(out, config_line(args))
    png = plot(out)
    print(report)
    log(f"done in {time.monotonic() - started:.0f}s: {out / 'results.csv'}, {out / 'results.md'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
