#!/usr/bin/env python
"""Which cycle settings close the gap to the ceiling at deep pruning levels? Side by side, same subsets.

The paper protocol (bench/paper_protocol.py) compares methods; this compares *variants of one cycle* on
the same base model, class subsets and epoch budget, and reports each variant's distance to the ceiling
(the unpruned base fine-tuned on the subset with the whole budget). A variant is a criterion with
overrides of the cycle settings:

    taylor                          library defaults: uniform allocation, n_f = epochs // 3, --lr, distillation 0.5
    taylor:alloc=global             global allocation
    taylor:alloc=uniform+global     both allocations tried, the better on the validation split kept
    taylor:nf=1,lr=0.03,kd=0        one fine-tuning epoch, peak lr 0.03, no distillation on labelled samples

Keys: alloc (uniform|global|uniform+global), nf (fine-tuning epochs before pruning), fade (epochs of fading the doomed
channels out before removing them; the retraining gets what is left of the budget), lr (peak lr of fine-tuning and
retraining), kd (distill_weight), T (temperature), cal (calibration batches of data-aware criteria), aug (0: no
crop/flip augmentation while fading and retraining; fine-tuning the unpruned model keeps it), bs (batch size),
mlr (the largest share of its channels any one layer may lose), pat (early-stopping patience, overriding --patience),
cool (share of the schedule over which an early stop at a high lr anneals it; 0: stop at once).
The ceiling is trained at --lr and --batch-size, with and without augmentation; validation picks one (as in the
protocol).

The base model is one a paper_protocol run saved (by default, that of its default --out). Subsets are
drawn with the protocol's generator; --per-class may be larger than the base's cap: the held-out split
is by file name, so the larger held-out set is a superset of the base's and never seen in training.
Writes results.csv (resumed) and results.md.

    python bench/retrain_ablation.py --variants taylor taylor:alloc=global --levels 0.8,0.9
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from paper_protocol import DEFAULT_OUT as PROTOCOL_OUT, csv_list
from protocol.data import DEFAULT_CACHE, DEFAULT_DATA, REPO, load_splits, make_subsets, restrict, subset_name, unpack
from protocol.progress import log
from protocol.runner import ceiling, top1
from prune_core import CycleConfig, ModelFormatError, TrainConfig, load_model, parse_allocations, run_cycle

DEFAULT_BASE = PROTOCOL_OUT / "models" / "cifar_small" / "base"
DEFAULT_OUT = REPO / "bench" / "out" / "retrain_ablation"
FIELDS = ["variant", "level", "subset", "subset_size", "accuracy", "ceiling", "params", "level_achieved", "seconds"]
KEYS = {"alloc": str, "nf": int, "fade": int, "lr": float, "kd": float, "T": float, "cal": int, "aug": int, "bs": int, "mlr": float, "pat": int, "cool": float}


def parse_variant(text: str, epochs: int, lr: float, batch_size: int, patience: int) -> tuple[str, CycleConfig]:
    """'taylor:alloc=global,nf=1' → (text, CycleConfig) with the protocol's defaults for what is not given."""
    criterion, _, opts = text.partition(":")
    given: dict = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in KEYS:
            raise SystemExit(f"retrain_ablation: bad variant option '{item}' in '{text}'; keys: {', '.join(KEYS)}")
        given[key] = KEYS[key](value)
    allocation = given.get("alloc", "uniform").replace("+", ",")
    try:
        parse_allocations(allocation)
    except ValueError as exc:
        raise SystemExit(f"retrain_ablation: {exc} in '{text}'") from None
    n_f, fade = given.get("nf", max(1, epochs // 3)), given.get("fade", 0)
    if not (0 <= n_f and 0 <= fade and n_f + fade < epochs):
        raise SystemExit(f"retrain_ablation: nf + fade must be in [0, {epochs}) in '{text}'")
    train_cfg = TrainConfig(
        epochs=epochs - n_f - fade, lr=given.get("lr", lr), distill_weight=given.get("kd", 0.5), temperature=given.get("T", 4.0),
        augment=bool(given.get("aug", 1)), batch_size=given.get("bs", batch_size), patience=given.get("pat", patience),
        cooldown=given.get("cool", TrainConfig.cooldown),
    )
    cfg = CycleConfig(
        criterion=criterion, allocation=allocation, finetune_before=n_f, fade_epochs=fade, train=train_cfg,
        calibration_batches=given.get("cal", 32), max_layer_ratio=given.get("mlr", CycleConfig.max_layer_ratio),
    )
    return text, cfg


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", required=True, help="criterion[:key=value,...] (see the module docstring)")
    p.add_argument("--levels", default="0.8,0.9", help="comma-separated pruning levels")
    p.add_argument("--subset-sizes", default="2,3,5", help="comma-separated class-subset sizes")
    p.add_argument("--subsets-per-size", type=int, default=3)
    p.add_argument("--per-class", type=int, default=1000, help="images per class before the split")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="score on the held-out images of a larger cap per class (a superset of --per-class's, never trained "
                        "on): less noise in each subset's score at the same training data")
    p.add_argument("--epochs", type=int, default=6, help="budget of every variant and of the ceiling")
    p.add_argument("--lr", type=float, default=0.01, help="peak lr unless a variant sets its own")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the ceiling, and of variants that set none")
    p.add_argument("--patience", type=int, default=TrainConfig.patience,
                   help="early-stopping patience of the ceiling and every variant (epochs; larger than --epochs: never stop)")
    p.add_argument("--base", default=str(DEFAULT_BASE), help="model directory of the 10-class base model")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 tarball of train/<class>/NNNN.jpg")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the tarball is unpacked (once)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.levels = csv_list(args.levels, float)
    args.subset_sizes = csv_list(args.subset_sizes, int)
    args.variants = [parse_variant(v, args.epochs, args.lr, args.batch_size, args.patience) for v in args.variants]
    return args


def load_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {(r["variant"], r["level"], r["subset"]): r for r in csv.DictReader(fh) if r.get("seconds")}


def report(rows: list[dict], variants: list[str], levels: list[float]) -> str:
    """Per level and variant: mean accuracy, mean and worst (ceiling − accuracy), by subset size too."""
    sizes = sorted({int(r["subset_size"]) for r in rows})
    head = "| level | variant | top-1 | to ceiling | worst | " + " | ".join(f"to ceiling ({k} cl.)" for k in sizes) + " |"
    lines = [head, "|" + "---|" * (5 + len(sizes))]
    for level in levels:
        for v in variants:
            mine = [r for r in rows if r["variant"] == v and r["level"] == f"{level:.2f}"]
            if not mine:
                continue
            gap = [float(r["ceiling"]) - float(r["accuracy"]) for r in mine]
            by_size = []
            for k in sizes:
                g = [float(r["ceiling"]) - float(r["accuracy"]) for r in mine if int(r["subset_size"]) == k]
                by_size.append(f"{100 * sum(g) / len(g):+.1f}" if g else "–")
            acc = sum(float(r["accuracy"]) for r in mine) / len(mine)
            lines.append(
                f"| {level:.2f} | {v} | {100 * acc:.1f} | {100 * sum(gap) / len(gap):+.1f} | {100 * max(gap):+.1f} | "
                + " | ".join(by_size) + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        base, card = load_model(args.base, torch.device("cpu"))
    except ModelFormatError as exc:
        raise SystemExit(f"retrain_ablation: no base model ({exc}); train one with bench/paper_protocol.py or pass --base")
    splits = load_splits(unpack(Path(args.data), Path(args.cache)), card.input_size, args.per_class, 0.1, args.test_per_class)
    subsets = make_subsets(args.subset_sizes, args.subsets_per_size, args.seed)
    path = out / "results.csv"
    done = load_rows(path)
    ceilings: dict[str, float] = {}
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        if not done:
            writer.writeheader()
        for classes in subsets:
            name = subset_name(classes)
            fit, val, test = (restrict(s, classes) for s in (splits.fit, splits.val, splits.test))
            for level in args.levels:
                for label, cfg in args.variants:
                    if (label, f"{level:.2f}", name) in done:
                        continue
                    if name not in ceilings:
                        known = [r for r in done.values() if r["subset"] == name]
                        if known:
                            ceilings[name] = float(known[0]["ceiling"])
                        else:
                            (ceilings[name], _), augment, _ = ceiling(
                                base, fit, val, test,
                                lambda aug: TrainConfig(
                                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, augment=aug,
                                    patience=args.patience,
                                ), torch.device("cpu"),
                            )
                            log(f"{name}: ceiling {ceilings[name]:.4f} (augment={bool(augment)})")
                    t = time.monotonic()
                    cfg = replace(cfg, level=level, train=replace(cfg.train, seed=args.seed))
                    result = run_cycle(base, card, fit, val, cfg)
                    acc = top1(result.model, test, torch.device("cpu"))[0]
                    row = dict(
                        variant=label, level=f"{level:.2f}", subset=name, subset_size=len(classes), accuracy=f"{acc:.6f}",
                        ceiling=f"{ceilings[name]:.6f}", params=result.summary["params_after"],
                        level_achieved=f"{result.summary['level_achieved']:.4f}", seconds=f"{time.monotonic() - t:.1f}",
                    )
                    writer.writerow(row)
                    fh.flush()
                    done[(label, row["level"], name)] = row
                    log(f"{name} {level:.2f} {label}: {acc:.4f} (ceiling {ceilings[name]:.4f}, {row['seconds']}s)")
    text = report(list(done.values()), [v for v, _ in args.variants], args.levels)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
