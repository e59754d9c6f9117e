"""The protocol's runs: each network's base model, the data-agnostic baseline once per level, and per class
subset the deployed model, the ceiling and the data-aware methods; every finished row goes to results.csv
at once, so a rerun (or the next device lease) resumes. Results are deterministic for a given seed, device
and thread count."""
from __future__ import annotations

import argparse
import copy
import json
import time
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
    load_model,
    pick_device,
    run_cycle,
    save_model,
    train,
)
from prune_core.model_format import ModelFormatError

from .data import CIFAR_MEAN, CIFAR_STD, CLASSES, HOLDOUT, Splits, load_splits, make_subsets, restrict, subset_name, unpack
from .progress import OutOfTime, Progress, log
from .results import DATA_AWARE, METHODS, PER_SUBSET_ONCE, Results, check_config, level_key

RECIPE = 6  # bumped when prune_core's cycle changes what a method does, so old results are not mixed in
BASELINE_AUGMENT = (True, False)  # the ceiling and agnostic runs are trained both ways; validation picks one per subset


def input_size(net: str, args: argparse.Namespace) -> int:
    """--image-size when given, else the network's own default."""
    return ARCHS[net].image_size if args.image_size is None else args.image_size


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
