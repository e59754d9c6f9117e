#!/usr/bin/env python
"""Issue 20's measurement: how much of a specialised device's accuracy prior correction recovers with no labels.

A base model is trained on all ten CIFAR-10 classes (1,000 images per class by default, 20 % of them held out
by file name for early stopping, calibration and BBSE's confusion matrix). A device sees only a subset of the
classes: a stream of unlabelled images (500 per class of the subset) and other images to score (500 per class,
10-way argmax). Stream and scored images come from positions 1000-1999 of each class's sorted file list, so
they are disjoint from each other and from everything the base model was trained or calibrated on. Rows:

  served        the base model as deployed;
  em_none       class prior re-estimated by EM (Saerens et al. 2002) on the stream's raw softmax, outputs reweighted;
  em_temp       the same on temperature-scaled probabilities (T fitted on the labelled held-out split);
  em_bcts       the same on bias-corrected temperature scaling (Alexandari et al. 2020);
  bbse          prior from the held-out confusion matrix and the stream's prediction shares (Lipton et al. 2018),
                applied to the temperature-scaled probabilities;
  oracle        argmax restricted to the true subset (the upper bound of any prior correction);
  em_temp_wN    em_temp over the last N stream samples only (what a PriorTracker of window N holds; `--windows`);
  em_temp_gateG em_temp only where its estimate is at least G from the source prior (total variation), else
                served as deployed (`--gate`);
  em_temp_floorF em_temp with another floor (`--extra-floors`).

Every correction uses `--floor` (a minimum target prior share per class) unless its row says otherwise. A
subset of all ten classes (no shift) is always included: a correction must not hurt there.
Prior error is the total variation distance between the estimated and the true class shares of the stream.

Writes bench/out/label_shift/results.json and results.md (printed too); base models and their logits are cached
under bench/out/label_shift/models/<network>/ so reruns skip training and inference.

    python bench/label_shift.py                               # resnet18 @32, 10 subsets of 2, 3 and 5 classes
    python bench/label_shift.py --networks resnet18,cifar_small --subsets-per-size 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paper_protocol import csv_list
from protocol.data import CIFAR_MEAN, CIFAR_STD, CLASSES, DEFAULT_CACHE, DEFAULT_DATA, REPO, make_subsets, subset_name, unpack
from prune_core import ARCHS, ImageSet, ModelCard, ModelFormatError, TrainConfig, batches, build_model, load_image_folder, load_model, save_model, split_holdout, train
from prune_core.jsonsafe import finite
from prune_core.label_shift import (
    DEFAULT_FLOOR, Calibration, CalibrationMethod, PriorTracker, bbse_prior, class_prior, confusion_matrix, correct, em_prior,
    fit_calibration, predicted_distribution, total_variation,
)

DEFAULT_OUT = REPO / "bench" / "out" / "label_shift"
HOLDOUT_SALT = "label-shift-heldout"
METHODS = ("served", "em_none", "em_temp", "em_bcts", "bbse", "oracle")
RECIPE = 1  # bumped when what a base model is trained on changes, so a stale cache is not reused


def log(msg: str) -> None:
    print(f"[label_shift {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None, extend=None, description: str | None = None) -> argparse.Namespace:
    """This script's arguments; `extend(parser)` adds a caller's own (bench/feature_adapt.py)."""
    p = argparse.ArgumentParser(description=description or "Label-shift estimation and prior correction on CIFAR-10 class subsets (issue 20).")
    p.add_argument("--networks", default="resnet18", help="comma-separated architectures, served at 32x32 (default resnet18)")
    p.add_argument("--base-per-class", type=int, default=1000, help="base-model images per class, 20%% of them held out")
    p.add_argument("--stream-per-class", type=int, default=500, help="unlabelled stream images per class of a subset")
    p.add_argument("--score-per-class", type=int, default=500, help="scored images per class of a subset")
    p.add_argument("--base-epochs", type=int, default=10, help="epochs of base-model training")
    p.add_argument("--base-lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--subset-sizes", default="2,3,5")
    p.add_argument("--subsets-per-size", type=int, default=10)
    p.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help="minimum target prior share of every class")
    p.add_argument("--extra-floors", default="0,0.01,0.03", help="more floors reported for em_temp ('' for none)")
    p.add_argument("--windows", default="256,512,1024", help="PriorTracker windows reported for em_temp")
    p.add_argument("--gate", type=float, default=0.2,
                   help="em_temp_gate row: correct only when the estimate is this far (total variation) from the source prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core CPU)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the tarball is unpacked (once)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    if extend is not None:
        extend(p)
    args = p.parse_args(argv)
    args.networks = csv_list(args.networks, str)
    args.subset_sizes = csv_list(args.subset_sizes, int)
    args.extra_floors = csv_list(args.extra_floors, float) if args.extra_floors.strip() else []
    args.windows = csv_list(args.windows, int) if args.windows.strip() else []
    for net in args.networks:
        if net not in ARCHS:
            p.error(f"unknown network '{net}'")
    return args


@dataclass
class Pools:
    """The images of one run: base training, labelled held-out, the unlabelled stream pool and the scored pool."""

    fit: ImageSet
    held: ImageSet
    stream: ImageSet
    score: ImageSet


def position_in_class(labels: torch.Tensor) -> torch.Tensor:
    """For each image, its index among the images of its class (the loader keeps each class's files sorted)."""
    pos = torch.empty_like(labels)
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        pos[idx] = torch.arange(len(idx))
    return pos


def load_pools(root: Path, args) -> Pools:
    base_n, stream_n, score_n = args.base_per_class, args.stream_per_class, args.score_per_class
    data = load_image_folder(root, CLASSES, 32, limit_per_class=base_n + stream_n + score_n)
    pos = position_in_class(data.labels)
    pick = lambda lo, hi: data.subset(torch.nonzero((pos >= lo) & (pos < hi)).flatten())  # noqa: E731
    fit, held = split_holdout(pick(0, base_n), 0.2, salt=HOLDOUT_SALT)
    return Pools(fit, held, pick(base_n, base_n + stream_n), pick(base_n + stream_n, base_n + stream_n + score_n))


def base_model(net: str, pools: Pools, args, model_dir: Path):
    """Trained on `pools.fit` (early stopping on `pools.held`), or loaded from `model_dir` when its recipe matches."""
    recipe = {"recipe": RECIPE, "net": net, "base_per_class": args.base_per_class, "epochs": args.base_epochs,
              "lr": args.base_lr, "batch_size": args.batch_size, "seed": args.seed}
    stamp = model_dir / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        try:
            model, _ = load_model(model_dir)
            log(f"{net}: base model loaded from {model_dir}")
            return model, json.loads((model_dir / "train.json").read_text())
        except (ModelFormatError, OSError, ValueError):
            pass
    torch.manual_seed(args.seed)
    model = build_model(net, len(CLASSES))
    cfg = TrainConfig(epochs=args.base_epochs, batch_size=args.batch_size, lr=args.base_lr, seed=args.seed,
                      patience=max(3, args.base_epochs // 4))
    log(f"{net}: training the base model, {args.base_epochs} epochs on {len(pools.fit)} images")
    result = train(model, pools.fit, pools.held, CIFAR_MEAN, CIFAR_STD, cfg)
    info = {"seconds": round(result.seconds, 1), "best_epoch": result.best_epoch, "held_out_top1": result.best_score,
            "train_images": len(pools.fit), "held_out_images": len(pools.held)}
    save_model(model, ModelCard(net, len(CLASSES), list(CLASSES), 32, mean=CIFAR_MEAN, std=CIFAR_STD), model_dir)
    (model_dir / "train.json").write_text(json.dumps(info) + "\n")
    stamp.write_text(json.dumps(recipe) + "\n")
    (model_dir / "logits.pt").unlink(missing_ok=True)
    log(f"{net}: trained in {result.seconds:.0f}s, best epoch {result.best_epoch}, held-out top-1 {result.best_score:.4f}")
    return model, info


@torch.no_grad()
def logits_of(model, data: ImageSet) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in batches(data, 256, CIFAR_MEAN, CIFAR_STD)]).double()


def cached_per_pool(path: Path, pools: Pools, compute) -> dict:
    """`compute(images)` for the held-out, stream and scored pools, cached at `path` for these very images."""
    keys = {name: getattr(pools, name).keys for name in ("held", "stream", "score")}
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("keys") == keys and "data" in cached:  # an older cache of other keys is recomputed
            return cached["data"]
    out = {name: compute(getattr(pools, name)) for name in keys}
    torch.save({"keys": keys, "data": out}, path)
    return out


def cached_logits(model, pools: Pools, model_dir: Path) -> dict[str, torch.Tensor]:
    return cached_per_pool(model_dir / "logits.pt", pools, lambda data: logits_of(model, data))


def nll_ece(probs, labels: torch.Tensor, bins: int = 15) -> tuple[float, float]:
    """Negative log-likelihood and expected calibration error (equal-width confidence bins)."""
    probs = torch.as_tensor(probs)  # label_shift answers numpy
    nll = float(-probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())
    conf, pred = probs.max(1)
    hit = (pred == labels).double()
    which = (conf * bins).long().clamp_max(bins - 1)
    ece = sum(float((hit[which == b].mean() - conf[which == b].mean()).abs()) * int((which == b).sum())
              for b in range(bins) if (which == b).any()) / len(labels)
    return nll, ece


def top1(probs, labels) -> float:
    """Top-1 of probabilities or logits (array or tensor) against labels."""
    return float((np.asarray(probs).argmax(1) == np.asarray(labels)).mean())


def evaluate_subset(classes, logits, pools: Pools, cals: dict[str, Calibration], source: np.ndarray,
                    confusion: np.ndarray, args, order_seed: int) -> dict:
    """Every method's top-1 on the subset's scored images, and each estimator's prior error."""
    k = len(CLASSES)
    sub = torch.tensor(classes)
    in_stream = torch.isin(pools.stream.labels, sub)
    in_score = torch.isin(pools.score.labels, sub)
    gen = torch.Generator().manual_seed(order_seed)
    stream_idx = torch.nonzero(in_stream).flatten()
    stream_idx = stream_idx[torch.randperm(len(stream_idx), generator=gen)]  # the order traffic arrives in
    s_logits, y = logits["stream"][stream_idx], pools.score.labels[in_score]
    t_logits = logits["score"][in_score]
    truth = torch.bincount(pools.stream.labels[stream_idx], minlength=k).double()
    truth = truth / truth.sum()
    probs = {name: cal.apply(t_logits) for name, cal in cals.items()}
    priors = {f"em_{name}": em_prior(cal.apply(s_logits), source, max_iter=1000, tol=1e-7) for name, cal in cals.items()}
    priors["bbse"] = bbse_prior(confusion, predicted_distribution(s_logits))
    uses = {"em_none": "none", "em_temp": "temp", "em_bcts": "bcts", "bbse": "temp"}
    for w in args.windows:  # what a PriorTracker of that window holds at the end of the stream
        tracker = PriorTracker(source, window=w, min_samples=min(w, len(stream_idx)), max_iter=1000, tol=1e-7)
        tracker.add(cals["temp"].apply(s_logits))
        priors[f"em_temp_w{w}"], uses[f"em_temp_w{w}"] = tracker.estimate(), "temp"
    acc = {"served": top1(probs["none"], y)}
    for name, q in priors.items():
        acc[name] = top1(correct(probs[uses[name]], source, q, args.floor), y)
    gated = total_variation(priors["em_temp"], source) >= args.gate
    acc[f"em_temp_gate{args.gate:g}"] = acc["em_temp"] if gated else acc["served"]
    mask = torch.full((k,), float("-inf"), dtype=torch.float64)
    mask[sub] = 0.0
    acc["oracle"] = top1(t_logits + mask, y)
    for f in args.extra_floors:
        acc[f"em_temp_floor{f:g}"] = top1(correct(probs["temp"], source, priors["em_temp"], f), y)
    return {
        "subset": subset_name(classes), "size": len(classes), "stream": len(stream_idx), "scored": len(y),
        "top1": acc, "prior_tv": {name: total_variation(q, truth) for name, q in priors.items()},
        "prior": {name: [round(float(v), 4) for v in q] for name, q in priors.items()},
        "em_temp_shift_tv": total_variation(priors["em_temp"], source),
    }


def run_network(net: str, pools: Pools, args, out: Path) -> dict:
    model_dir = out / "models" / net
    model, info = base_model(net, pools, args, model_dir)
    logits = cached_logits(model, pools, model_dir)
    held_y = pools.held.labels
    cals = {
        "none": Calibration(),
        "temp": fit_calibration(logits["held"], held_y, CalibrationMethod.TEMPERATURE),
        "bcts": fit_calibration(logits["held"], held_y, CalibrationMethod.BCTS),
    }
    source = class_prior(pools.fit.labels, len(CLASSES))
    confusion = confusion_matrix(logits["held"].argmax(1), held_y, len(CLASSES))
    calibration = {}
    for name, cal in cals.items():  # judged on the balanced scored pool (never used for fitting)
        nll, ece = nll_ece(cal.apply(logits["score"]), pools.score.labels)
        calibration[name] = {**cal.to_dict(), "score_nll": nll, "score_ece": ece}
    subsets = [tuple(range(len(CLASSES)))] + make_subsets(args.subset_sizes, args.subsets_per_size, args.seed)
    rows = [evaluate_subset(c, logits, pools, cals, source, confusion, args, order_seed=args.seed * 7919 + i)
            for i, c in enumerate(subsets)]
    return {"network": net, "base": info, "score_top1_10way": top1(logits["score"], pools.score.labels),
            "calibration": calibration, "rows": rows}


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(results: list[dict], args) -> str:
    lines = []
    for res in results:
        rows = [r for r in res["rows"] if r["size"] < len(CLASSES)]
        noshift = [r for r in res["rows"] if r["size"] == len(CLASSES)][0]
        methods = list(rows[0]["top1"])
        lines += [f"### {res['network']} @32: base held-out top-1 {_pct(res['base']['held_out_top1'])}, "
                  f"10-way top-1 on the balanced scored pool {_pct(res['score_top1_10way'])}", ""]
        lines += ["| calibration | T | NLL (scored pool) | ECE |", "|---|---|---|---|"]
        for name, c in res["calibration"].items():
            lines.append(f"| {name} | {c['temperature']:.3f} | {c['score_nll']:.3f} | {100 * c['score_ece']:.1f} % |")
        sizes = sorted({r["size"] for r in rows})
        head = [f"{s} classes (n={sum(r['size'] == s for r in rows)})" for s in sizes]
        lines += ["", "Mean top-1 over subsets (10-way argmax), prior error (total variation) in brackets; "
                  "'< served' counts subsets where the method lost to the served model; the last column is the "
                  "10-class stream (no shift).", "",
                  "| method | " + " | ".join(head) + " | all | < served | no shift |",
                  "|---|" + "---|" * (len(sizes) + 3)]
        for m in methods:
            cells = []
            for s in sizes + [None]:
                rs = [r for r in rows if s is None or r["size"] == s]
                cell = _pct(sum(r["top1"][m] for r in rs) / len(rs))
                if m in rs[0]["prior_tv"]:
                    cell += f" ({sum(r['prior_tv'][m] for r in rs) / len(rs):.3f})"
                cells.append(cell)
            worse = sum(r["top1"][m] < r["top1"]["served"] - 1e-12 for r in rows)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {worse}/{len(rows)} | {_pct(noshift['top1'][m])} |")
        lines += ["", "| subset | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for r in res["rows"]:
            lines.append(f"| {r['subset'] if r['size'] < len(CLASSES) else 'all ten'} | "
                         + " | ".join(_pct(r["top1"][m]) for m in METHODS) + " |")
        lines.append("")
    return "\n".join(lines)


def prepare(args: argparse.Namespace) -> tuple[Path, Pools]:
    """Threads set, the output folder made, the images unpacked and split into pools (shared with
    bench/unlabelled_cycle.py)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = unpack(Path(args.data), Path(args.cache))
    log("decoding images")
    return out, load_pools(root, args)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    out, pools = prepare(args)
    log(f"fit {len(pools.fit)}, held-out {len(pools.held)}, stream pool {len(pools.stream)}, scored pool {len(pools.score)}")
    results = [run_network(net, pools, args, out) for net in args.networks]
    config = {k: v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps(finite({"config": config, "results": results}), indent=1) + "\n")
    text = report(results, args)
    (out / "results.md").write_text(text + "\n")
    print(text)
    log(f"done in {time.monotonic() - started:.0f}s; wrote {out / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
