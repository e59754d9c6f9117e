#!/usr/bin/env python
"""Issue 20's benchmark of the daemon's cycle on unlabelled traffic, run in-process as the daemon's worker runs it.

The served models are bench/label_shift.py's base models (trained on all ten CIFAR-10 classes, cached under
bench/out/label_shift/models/<net>/; run that script first, nothing is trained here), calibrated on their labelled
held-out split as `edgetune train`/`calibrate` does (prune_core.calibrate.calibrated_card). For each class subset
(bench/label_shift.py's subsets and pools) and label rate:

  stream       500 images per class of the subset in a random order, a share of them labelled (`--label-rates`;
               the labelled ones of a lower rate are among those of a higher one), split 80/20 into training and
               held-out samples by a hash of the key, as the daemon's buffer does (holdout_fraction 0.2);
  prior        what daemon/serving/prior_adapter.py holds after the stream: EM over the last 1024 temperature-calibrated
               outputs, re-estimated every 10 samples; the cycle's target prior only past the 0.2 gate (total
               variation from the model's prior), as scheduler.py passes `served.prior.target()`;
  cycle        daemon/workers/worker.py's steps: corrected_teacher(model, card, target prior, floor), the held-out samples
               split into choosing and judging ones (split_judging, cycle_judge_share), run_cycle with the
               daemon's default settings (daemon/ops/config.py) but the level from `--levels`, decide() with its
               defaults.

Scored on 500 other images per class of the subset (10-way argmax). Rows:

  served       the base model as deployed;
  prior        its calibrated outputs corrected to the estimated prior where past the gate (what the daemon serves
               before any cycle, and after a rejected one);
  cycle        the cycle's model (its own card carries the target prior, so the daemon serves its plain argmax);
  daemon       what the daemon serves after the cycle: the cycle's model if accepted, else `prior`;
  oracle       the base model's argmax restricted to the subset (the upper bound of any prior correction);
  ceiling      the unpruned base model fine-tuned with every stream label (the training split; held-out for early
               stopping), the cycle's own ceiling recipe (cross-entropy, cycle_epochs epochs, cycle_min_steps steps).

Every finished (network, subset, rate, level) and ceiling is cached as JSON under --out/runs/, so a rerun resumes.
Writes --out/results.json and results.md (printed too).

    python bench/unlabelled_cycle.py                                    # cifar_small, 2 subsets of 2, 3, 5 classes
    python bench/unlabelled_cycle.py --networks cifar_small,resnet18 --subsets-per-size 10 --label-rates 0,0.01,0.1,0.33
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from label_shift import DEFAULT_OUT as LABEL_SHIFT_OUT
from label_shift import Pools, cached_logits, prepare
from paper_protocol import csv_list
from protocol.data import CLASSES, DEFAULT_CACHE, DEFAULT_DATA, REPO, make_subsets, subset_name
from prune_core import CycleConfig, TrainConfig, load_model, run_cycle, train
from prune_core.calibrate import calibrated_card
from prune_core.cycle import adaptation
from prune_core.data import ImageSet, batches, holdout_mask, split_judging
from prune_core.jsonsafe import finite
from prune_core.label_shift import PriorTracker, correct, total_variation
from prune_core.measure import count_params
from prune_core.options import parse_level
from prune_core.retrain import patient
from prune_core.teacher import corrected_teacher

sys.path.insert(0, str(REPO))
from daemon.ops.config import Settings  # noqa: E402  (the daemon's defaults, read from its own settings)
from daemon.serving.prior_adapter import PriorSettings  # noqa: E402
from daemon.cycles.acceptance import Acceptance, decide  # noqa: E402
from daemon.workers.worker import close_enough  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "out" / "unlabelled_cycle"
BUFFER_SALT = "unlabelled-cycle-buffer"
LABEL_SALT = 104729  # seeds which stream samples carry labels
UPDATE_EVERY = 10  # answers between two of the daemon's estimates (one scheduler poll's worth of traffic)


def log(msg: str) -> None:
    print(f"[unlabelled_cycle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The daemon's cycle on unlabelled traffic, on CIFAR-10 class subsets (issue 20).")
    p.add_argument("--networks", default="cifar_small", help="comma-separated; base models from bench/label_shift.py")
    p.add_argument("--subset-sizes", default="2,3,5")
    p.add_argument("--subsets-per-size", type=int, default=2)
    p.add_argument("--label-rates", default="0,0.1", help="shares of the stream that carry labels")
    p.add_argument("--levels", default="0.8", help="comma-separated cycle levels: fractions, or auto (the daemon's default)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the fully labelled ceiling")
    p.add_argument("--kd-temperature", type=float, default=None,
                   help="an ablation: distil at this temperature instead of TrainConfig's default (the daemon's)")
    p.add_argument("--epochs", type=int, default=None, help="an ablation: cycle_epochs instead of the daemon's default")
    p.add_argument("--min-steps", type=int, default=None, help="an ablation: cycle_min_steps instead of the daemon's default")
    p.add_argument("--judge-share", type=float, default=None, help="an ablation: cycle_judge_share instead of the daemon's default")
    p.add_argument("--budget", type=float, default=None, help="an ablation: cycle_distil_budget_s instead of the daemon's default")
    p.add_argument("--prune-steps", type=int, default=None, help="an ablation: cycle_prune_steps instead of the daemon's default")
    p.add_argument("--kd-loss", default=None, choices=("kl", "mse"), help="an ablation: the patient recipe's distillation loss")
    p.add_argument("--first-subsets", type=int, default=None, help="run only the first N subsets of each network (choosing a recipe)")
    p.add_argument("--patience", default=None,
                   help="instead of cycles: the patience curve, top-1 of a one-shot 75 %% student against its retraining epochs "
                        "(comma-separated), patient recipe against plain views; writes --out/patience.png")
    p.add_argument("--base-per-class", type=int, default=1000, help="as bench/label_shift.py was run")
    p.add_argument("--stream-per-class", type=int, default=500)
    p.add_argument("--score-per-class", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=str(LABEL_SHIFT_OUT / "models"), help="bench/label_shift.py's model cache")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    args.networks = csv_list(args.networks, str)
    args.subset_sizes = csv_list(args.subset_sizes, int)
    args.label_rates = csv_list(args.label_rates, float)
    args.levels = [parse_level(v) for v in csv_list(args.levels, str)]
    return args


def cycle_config(s: Settings, level, seed: int, kd_temperature: float | None = None, kd_loss: str | None = None) -> CycleConfig:
    """What scheduler.py puts in a CycleJob and worker.py turns into a CycleConfig, at `level`."""
    cfg = TrainConfig(epochs=s.cycle_epochs, batch_size=s.cycle_batch_size, min_steps=s.cycle_min_steps, flip=s.cycle_hflip, seed=seed,
                      recent_half_life=s.cycle_recent_half_life or None)
    if s.cycle_recipe == "patient":
        cfg = patient(cfg, s.cycle_distil_budget_s or None)
    if kd_temperature is not None:
        cfg = replace(cfg, temperature=kd_temperature)
    if kd_loss is not None:
        cfg = replace(cfg, kd_loss=kd_loss)
    return CycleConfig(
        level=level, criterion=s.cycle_criterion, allocation=s.cycle_allocation, finetune_before=s.cycle_finetune_before,
        tolerance=s.cycle_tolerance, train=cfg, prune_steps=s.cycle_prune_steps,
    )


@torch.no_grad()
def argmax_of(model, data: ImageSet, card) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).argmax(1) for x, _ in batches(data, 256, card.mean, card.std)])


def acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def daemon_prior(card, probs: np.ndarray, prior: PriorSettings) -> np.ndarray | None:
    """The PriorAdapter's estimate after `probs` arrived in order (every UPDATE_EVERY samples, warm-started)."""
    tracker = PriorTracker(np.asarray(card.prior(), dtype=np.float64), window=prior.window, min_samples=prior.min_samples)
    estimate = None
    for start in range(0, len(probs), UPDATE_EVERY):
        tracker.add(probs[start:start + UPDATE_EVERY])
        estimate = tracker.estimate()
    return estimate


class Subset:
    """One device: its stream (in arrival order), its scored images, and what serving without training gets."""

    def __init__(self, index: int, classes, net_state: dict, pools: Pools, logits: dict, args, s: Settings):
        self.classes, self.name = classes, subset_name(classes)
        card = net_state["card"]
        sub = torch.tensor(classes)
        gen = torch.Generator().manual_seed(args.seed * 7919 + index)  # bench/label_shift.py's arrival order
        idx = torch.nonzero(torch.isin(pools.stream.labels, sub)).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        self.stream = pools.stream.subset(idx)
        in_score = torch.isin(pools.score.labels, sub)
        self.score = pools.score.subset(torch.nonzero(in_score).flatten())
        self.y = self.score.labels
        cal = card.calibration()
        self.source = np.asarray(card.prior(), dtype=np.float64)
        prior = PriorSettings.from_settings(s)
        self.estimate = daemon_prior(card, cal.apply(logits["stream"][idx]), prior)
        self.shift = None if self.estimate is None else total_variation(self.estimate, self.source)
        self.target = [float(v) for v in self.estimate] if self.shift is not None and self.shift >= prior.gate else None
        t_logits = logits["score"][in_score]
        served = t_logits.argmax(1)
        corrected = torch.from_numpy(correct(cal.apply(t_logits), self.source, self.target, prior.floor).argmax(1)) if self.target else served
        mask = torch.full((len(CLASSES),), float("-inf"), dtype=torch.float64)
        mask[sub] = 0.0
        self.top1 = {"served": acc(served, self.y), "prior": acc(corrected, self.y), "oracle": acc((t_logits + mask).argmax(1), self.y)}
        truth = torch.bincount(self.stream.labels, minlength=len(CLASSES)).double()
        self.prior_tv = None if self.estimate is None else total_variation(self.estimate, truth / truth.sum())

    def buffer(self, rate: float, seed: int, holdout_fraction: float) -> tuple[ImageSet, ImageSet]:
        """The daemon's buffer after the stream: a `rate` share labelled, split 80/20 by key."""
        n = len(self.stream)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * LABEL_SALT + 1))
        labels = torch.full((n,), -1, dtype=torch.long)
        keep = order[: round(rate * n)]
        labels[keep] = self.stream.labels[keep]
        data = ImageSet(self.stream.images, labels, self.stream.keys)
        held = holdout_mask(data.keys, holdout_fraction, BUFFER_SALT)
        return data.subset(torch.nonzero(~held).flatten()), data.subset(torch.nonzero(held).flatten())

    def describe(self) -> dict:
        return {"subset": self.name, "size": len(self.classes), "stream": len(self.stream), "scored": len(self.y),
                "top1": self.top1, "prior_shift_tv": self.shift, "prior_error_tv": self.prior_tv,
                "prior_applied": self.target is not None,
                "estimate": None if self.estimate is None else dict(zip(CLASSES, (round(float(v), 4) for v in self.estimate)))}


def run_one_cycle(model, card, sub: Subset, rate: float, level, args, s: Settings) -> dict:
    """daemon/workers/worker.py's run_worker, minus the process, the buffer and the events."""
    train_set, held_set = sub.buffer(rate, args.seed, s.holdout_fraction)
    torch.manual_seed(args.seed)
    teacher = corrected_teacher(model, card, sub.target, s.prior_floor)
    started = time.monotonic()
    choosing, judging = split_judging(held_set, s.cycle_judge_share)
    result = run_cycle(teacher.model, teacher.student_card, train_set, choosing,
                       cycle_config(s, level, args.seed, args.kd_temperature, args.kd_loss), judge_set=judging,
                       close_enough=close_enough(Acceptance.of(s), teacher.corrected))
    result.summary["teacher"] = {"corrected": teacher.corrected, "note": teacher.note}
    accepted, reason = decide(result.summary, Acceptance.of(s))
    seconds = time.monotonic() - started
    cycle_top1 = acc(argmax_of(result.model, sub.score, card), sub.y)
    teacher_top1 = acc(argmax_of(teacher.model, sub.score, card), sub.y)
    control = run_control(teacher, train_set, choosing, judging, sub, card, level, args, s)
    keep = ("level", "level_achieved", "params_before", "params_after", "top1_before", "top1_after", "top1_ceiling",
            "evidence", "chosen_by", "agreement_with_before", "expected_loss", "expected_loss_se", "criterion_used",
            "train_samples", "choosing_samples", "held_out_samples", "held_out_labelled")
    return {
        "rate": rate, "level": level, "labelled_train": train_set.labelled, "labelled_held": held_set.labelled,
        "cycle_top1": cycle_top1, "teacher_top1": teacher_top1, "accepted": accepted, "reason": reason,
        "daemon_top1": cycle_top1 if accepted else sub.top1["prior"],
        "summary": {k: result.summary[k] for k in keep},
        "probes": [{k: p.get(k) for k in ("level", "achieved_level", "accuracy", "params", "feasible", "seconds", "clipped_steps")} for p in result.summary["probes"]],
        "teacher": result.summary["teacher"], "seconds": seconds, "control": control,
        "false_accept": accepted and cycle_top1 < teacher_top1 - s.max_accuracy_drop,
    }


def run_control(teacher, train_set, choosing, judging, sub: "Subset", card, level, args, s: Settings) -> dict:
    """A deliberately under-trained candidate, which the acceptance rule must reject: pruned in one step to
    the walk's last level (or `level`) and distilled for a fiftieth of the budget (the classic recipe's 1 epoch
    without one)."""
    config = cycle_config(s, level, args.seed, args.kd_temperature, args.kd_loss)
    short = replace(config.train, budget_s=config.train.budget_s / 50) if config.train.budget_s else replace(config.train, epochs=1, min_steps=0)
    config = replace(config, level=config.max_level if level == "auto" else level, prune_steps=1, finetune_before=0, train=short)
    result = run_cycle(teacher.model, teacher.student_card, train_set, choosing, config, judge_set=judging)
    result.summary["teacher"] = {"corrected": teacher.corrected, "note": teacher.note}
    accepted, reason = decide(result.summary, Acceptance.of(s))
    top1 = acc(argmax_of(result.model, sub.score, card), sub.y)
    return {"accepted": accepted, "reason": reason, "top1": top1, "level_achieved": result.summary["level_achieved"],
            "steps": [p["retrain_steps"] for p in result.summary["probes"]]}


def run_ceiling(model, card, sub: Subset, args, s: Settings) -> dict:
    """The unpruned model fine-tuned on the whole stream with labels (run_cycle's ceiling recipe)."""
    train_set, held_set = sub.buffer(1.0, args.seed, s.holdout_fraction)
    tuned = copy.deepcopy(model)
    started = time.monotonic()
    ft = adaptation(cycle_config(s, 0.5, args.seed).train, s.cycle_epochs)
    result = train(tuned, train_set, held_set, card.mean, card.std, ft)
    return {"top1": acc(argmax_of(tuned, sub.score, card), sub.y), "epochs_run": len(result.history),
            "held_out_top1": result.best_score, "clipped_steps": result.clipped_steps, "seconds": time.monotonic() - started}


def cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = finite(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)
    return value


def served_model(net: str, pools: Pools, args) -> dict:
    model_dir = Path(args.models) / net
    if not (model_dir / "recipe.json").is_file():
        raise SystemExit(f"unlabelled_cycle: no base model in {model_dir}; run bench/label_shift.py --networks {net} first")
    model, card = load_model(model_dir)
    card = calibrated_card(model, card, pools.held, pools.fit.labels)  # as `edgetune train` / `calibrate` records it
    return {"model": model, "card": card, "logits": cached_logits(model, pools, model_dir), "params": count_params(model)}


def run_network(net: str, pools: Pools, args, s: Settings, out: Path, done: list[dict]) -> dict:
    state = served_model(net, pools, args)
    model, card = state["model"], state["card"]
    log(f"{net}: T={card.temperature:.3f}, {state['params']} parameters")
    subsets = [tuple(range(len(CLASSES)))] + make_subsets(args.subset_sizes, args.subsets_per_size, args.seed)
    by_size = {}
    for i, c in enumerate(subsets[1:], start=1):
        by_size.setdefault(len(c), []).append((i, c))
    order = [x for group in zip(*by_size.values()) for x in group]  # interleave sizes: 2, 3, 5, 2, 3, 5, ...
    order += [x for group in by_size.values() for x in group if x not in order]
    order = order[:args.first_subsets] if args.first_subsets else order
    rows = []
    for i, classes in order:
        sub = Subset(i, classes, state, pools, state["logits"], args, s)
        row = sub.describe()
        slug = "-".join(str(c) for c in classes)
        row["cycles"] = []
        for rate in args.label_rates:
            for level in args.levels:
                kd = "" if args.kd_temperature is None else f"_kd{args.kd_temperature:g}"
                kd += f"_b{s.cycle_distil_budget_s:g}_s{s.cycle_prune_steps}" + ("" if args.kd_loss is None else f"_{args.kd_loss}")
                path = out / "runs" / net / f"{slug}_r{rate:g}_l{level}{kd}.json"
                if not path.is_file():
                    log(f"{net} {sub.name}: cycle at label rate {rate:g}, level {level}")
                got = cached(path, lambda: run_one_cycle(model, card, sub, rate, level, args, s))
                log(f"{net} {sub.name} r{rate:g} l{level}: cycle {got['cycle_top1']:.3f} "
                    f"({'accepted' if got['accepted'] else 'rejected'}: {got['reason']}; {got['seconds']:.0f}s)")
                row["cycles"].append(got)
        if not args.no_ceiling:
            row["ceiling"] = cached(out / "runs" / net / f"{slug}_ceiling.json", lambda: run_ceiling(model, card, sub, args, s))
        rows.append(row)
        write(out, args, done + [{"network": net, "temperature": card.temperature, "params": state["params"], "rows": rows}])
    return {"network": net, "temperature": card.temperature, "params": state["params"], "rows": rows}


# --------------------------------------------------------------------------- report


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def swap_table(rows: list[dict]) -> list[str]:
    """Issue 29's targets, per cycle: the candidate against the corrected teacher on the scored images, its
    verdict, whether that verdict was a false accept, and the under-trained control's verdict."""
    cycles = [(r["subset"], c) for r in rows for c in r["cycles"] if "control" in c]
    if not cycles:
        return []
    out = ["| subset | rate | level | teacher | cycle | Δ | params removed | verdict | false accept | control (top-1, verdict) | steps | seconds |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in cycles:
        delta = c["cycle_top1"] - c["teacher_top1"]
        steps = "+".join(str(p.get("retrain_steps", "")) for p in c["probes"]) if c["probes"] and "retrain_steps" in c["probes"][0] else ""
        out.append(f"| {name} | {c['rate']:g} | {c['level']} | {_pct(c['teacher_top1'])} | {_pct(c['cycle_top1'])} | {100 * delta:+.1f} | "
                   f"{100 * c['summary']['level_achieved']:.0f} % | {'A' if c['accepted'] else 'R'} | {'YES' if c['false_accept'] else 'no'} | "
                   f"{_pct(c['control']['top1'])}, {'A' if c['control']['accepted'] else 'R'} | {steps} | {c['seconds']:.0f} |")
    big = [c for _, c in cycles if c["accepted"] and c["summary"]["level_achieved"] >= 0.5]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    out += ["", f"Accepted with ≥ 50 % fewer parameters: {len(big)}/{len(cycles)}; mean Δ top-1 vs the corrected teacher "
            f"{100 * mean([c['cycle_top1'] - c['teacher_top1'] for _, c in cycles]):+.2f} (all candidates), "
            f"false accepts {sum(c['false_accept'] for _, c in cycles)}, controls rejected "
            f"{sum(not c['control']['accepted'] for _, c in cycles)}/{len(cycles)}, mean cycle {mean([c['seconds'] for _, c in cycles]):.0f} s.", ""]
    return out


def report(results: list[dict]) -> str:
    lines = []
    for res in results:
        rows = res["rows"]
        if not rows:
            continue
        lines += [f"### {res['network']} @32 (T={res['temperature']:.2f}, {res['params']:,} parameters), "
                  f"{len(rows)} subsets", ""]
        keys = sorted({(c["rate"], str(c["level"])) for r in rows for c in r["cycles"]})
        head = ["served", "prior", "oracle"] + [f"cycle r{rate:g} l{lv}" for rate, lv in keys] + ["ceiling"]
        lines += ["Top-1 (10-way argmax) on 500 scored images per class. A cycle cell: the cycle's model, then what the "
                  "daemon serves after it (the cycle's model if accepted, else the prior-corrected one) in brackets, "
                  "A/R accepted or rejected, L/G on labels or agreement, and the share of parameters removed.", "",
                  "| subset | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for r in rows:
            cells = [_pct(r["top1"]["served"]), _pct(r["top1"]["prior"]) + ("" if r["prior_applied"] else " (gate)"), _pct(r["top1"]["oracle"])]
            for rate, lv in keys:
                c = next((c for c in r["cycles"] if c["rate"] == rate and str(c["level"]) == lv), None)
                if c is None:
                    cells.append("")
                    continue
                ev = "L" if c["summary"]["evidence"] == "labels" else "G"
                cells.append(f"{_pct(c['cycle_top1'])} ({_pct(c['daemon_top1'])}) {'A' if c['accepted'] else 'R'}{ev} "
                             f"−{100 * c['summary']['level_achieved']:.0f} %")
            cells.append(_pct(r["ceiling"]["top1"]) if "ceiling" in r else "")
            lines.append(f"| {r['subset']} | " + " | ".join(cells) + " |")
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        cells = [_pct(mean([r["top1"][m] for r in rows])) for m in ("served", "prior", "oracle")]
        for rate, lv in keys:
            cs = [c for r in rows for c in r["cycles"] if c["rate"] == rate and str(c["level"]) == lv]
            acc_n = sum(c["accepted"] for c in cs)
            cells.append(f"{_pct(mean([c['cycle_top1'] for c in cs]))} ({_pct(mean([c['daemon_top1'] for c in cs]))}) {acc_n}/{len(cs)} A")
        cells.append(_pct(mean([r["ceiling"]["top1"] for r in rows if "ceiling" in r])))
        lines.append("| **mean** | " + " | ".join(cells) + " |")
        lines.append("")
        below = [(r["subset"], c["rate"]) for r in rows for c in r["cycles"] if c["daemon_top1"] < r["top1"]["served"] - 1e-12]
        lines.append(f"Subsets where what the daemon serves after the cycle is below the deployed model: {below or 'none'}.")
        lines.append(f"Prior-corrected below or equal to deployed: "
                     f"{[r['subset'] for r in rows if r['top1']['prior'] <= r['top1']['served']] or 'none'}.")
        lines.append("")
        lines += swap_table(rows)
    return "\n".join(lines)


def write(out: Path, args, results: list[dict]) -> str:
    config = {k: v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps(finite({"config": config, "results": results}), indent=1) + "\n")
    text = report(results)
    (out / "results.md").write_text(text + "\n")
    return text


def patience_curve(net: str, pools: Pools, args, s: Settings, out: Path) -> list[dict]:
    """Top-1 on the scored images of a student pruned once to 75 %, distilled for each of `args.patience`
    epochs from the corrected teacher on the unlabelled stream: the patient recipe (same mixed view, AdamW,
    cosine) against plain views (the classic SGD recipe, the teacher on the student's crop-and-flip view)."""
    state = served_model(net, pools, args)
    model, card = state["model"], state["card"]
    subsets = make_subsets(args.subset_sizes, args.subsets_per_size, args.seed)[: args.first_subsets or None]
    points = []
    for i, classes in enumerate(subsets, start=1):
        sub = Subset(i, classes, state, pools, state["logits"], args, s)
        train_set, held_set = sub.buffer(0.0, args.seed, s.holdout_fraction)
        teacher = corrected_teacher(model, card, sub.target, s.prior_floor)
        teacher_top1 = acc(argmax_of(teacher.model, sub.score, card), sub.y)
        for epochs in csv_list(args.patience, int):
            for recipe in ("patient", "plain"):
                path = out / "patience" / net / f"{'-'.join(map(str, classes))}_{recipe}_e{epochs}.json"

                def one() -> dict:
                    base = TrainConfig(epochs=epochs, batch_size=s.cycle_batch_size, min_steps=0, flip=s.cycle_hflip, seed=args.seed)
                    train_cfg = patient(base, None) if recipe == "patient" else base
                    config = replace(cycle_config(s, 0.75, args.seed), level=0.75, prune_steps=1, finetune_before=0, train=train_cfg)
                    started = time.monotonic()
                    result = run_cycle(teacher.model, teacher.student_card, train_set, held_set, config)
                    return {"subset": sub.name, "recipe": recipe, "epochs": epochs, "teacher_top1": teacher_top1,
                            "top1": acc(argmax_of(result.model, sub.score, card), sub.y),
                            "steps": result.summary["probes"][0]["retrain_steps"], "seconds": time.monotonic() - started}

                got = cached(path, one)
                log(f"{net} {sub.name} {recipe} {epochs} epochs: {got['top1']:.3f} (teacher {teacher_top1:.3f}; {got['seconds']:.0f}s)")
                points.append({"network": net, **got})
    return points


def plot_patience(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({p["network"] for p in points})
    fig, axes = plt.subplots(1, len(nets), figsize=(4.5 * len(nets), 3.4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        mine = [p for p in points if p["network"] == net]
        for recipe, style in (("patient", "o-"), ("plain", "s--")):
            by_epochs: dict[int, list[float]] = {}
            for p in mine:
                if p["recipe"] == recipe:
                    by_epochs.setdefault(p["epochs"], []).append(p["top1"] - p["teacher_top1"])
            xs = sorted(by_epochs)
            ax.plot(xs, [100 * np.mean(by_epochs[x]) for x in xs], style, label=f"{recipe} views")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(-0.5, color="grey", lw=0.6, ls=":")  # the target: within half a point of the teacher
        ax.set_xscale("log")
        ax.set_xlabel("retraining epochs (log)")
        ax.set_ylabel("top-1 − corrected teacher (points)")
        ax.set_title(f"{net}, 75 % pruned, 0 labels ({len({p['subset'] for p in mine})} subsets)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = {k: v for k, v in (("cycle_epochs", args.epochs), ("cycle_min_steps", args.min_steps),
                                ("cycle_judge_share", args.judge_share), ("cycle_distil_budget_s", args.budget),
                                ("cycle_prune_steps", args.prune_steps)) if v is not None}
    s = Settings(state_dir=Path("/nonexistent"), **budget)  # the daemon's defaults (no config file, no environment)
    started = time.monotonic()
    out, pools = prepare(args)
    if args.patience:
        points = [p for net in args.networks for p in patience_curve(net, pools, args, s, out)]
        (out / "patience.json").write_text(json.dumps(finite(points), indent=1) + "\n")
        plot_patience(points, out / "patience.png")
        log(f"wrote {out / 'patience.png'}")
        return
    results: list[dict] = []
    for net in args.networks:
        results.append(run_network(net, pools, args, s, out, results))
    print(write(out, args, results))
    log(f"done in {time.monotonic() - started:.0f}s; wrote {out / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
