#!/usr/bin/env python
"""Issue 28's measurement: prior correction on traffic whose classes change, answer by answer.

Reuses bench/label_shift.py's base models (CIFAR-10, 1,000 images per class, 32 px) and their cached logits: the
stream and scored pools (positions 1000-1999 of each class, never trained or calibrated on) are one pool of 1,000
images per class here. A stream draws each image's class from the scene's prior at that time and an unused image of
that class; every method answers each image as it arrives with the estimate it holds then, and re-estimates every
`--refresh` images (the daemon's scheduler poll). Calibration: temperature scaling fitted on the labelled held-out
split (the daemon serves calibrated answers); every correction is floored at `--floor`.

Scenarios (3-class subsets A, B, disjoint; `--pairs` pairs per scenario):
  stationary  A throughout;
  abrupt      A, then B;
  runs        A's classes one at a time, in runs of `--run` images, twice round;
  gradual     a sinusoidal mix of A and B (Bai et al. 2022), one period over the stream;
  return      A, B, then A again.

Methods (the same streams):
  deployed    the calibrated model, uncorrected;
  window_em   today's daemon: EM over the last 1,024 answers (64 before the first), corrected when the estimate is
              at least 0.2 (total variation) from the model's prior;
  fth         Wu et al. 2021, follow-the-history over per-refresh BBSE estimates;
  flh_ftl     Baby et al. 2023, FLH-FTL over per-refresh BBSE estimates;
  scene       prune_core.online_prior.OnlineCorrector (change detection on predicted shares, EM on the scene, the
              label-free safety rule);
  scene_1in10 the same with one image in ten labelled (spot checks of both counterfactual answers);
  batch_em    reference, in hindsight: EM over the whole stream;
  oracle      reference: the true prior of the scene at each time.

    python bench/online_shift.py --networks cifar_small,resnet18
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import label_shift as ls
from paper_protocol import csv_list
from protocol.data import CLASSES, REPO
from prune_core.jsonsafe import finite
from prune_core.label_shift import CalibrationMethod, PriorTracker, class_prior, confusion_matrix, correct, em_prior, fit_calibration, total_variation
from prune_core.online_prior import FlhFtl, FollowTheHistory, OnlineCorrector, likelihood_rows

SCENARIOS = ("stationary", "abrupt", "runs", "gradual", "return")
METHODS = ("deployed", "window_em", "fth", "flh_ftl", "scene", "scene_1in10", "batch_em", "oracle")
PUBLISHED = ("fth", "flh_ftl")
DEFAULT_OUT = REPO / "bench" / "out" / "online_shift"


def log(msg: str) -> None:
    print(f"[online_shift {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def extend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=6, help="subset pairs (A, B) per scenario")
    p.add_argument("--classes", type=int, default=3, help="classes per subset")
    p.add_argument("--phase", type=int, default=1200, help="images per scene (abrupt; stationary and gradual run 2 phases)")
    p.add_argument("--run", type=int, default=400, help="images per class run (runs)")
    p.add_argument("--refresh", type=int, default=16, help="images between re-estimates (the scheduler poll)")
    p.add_argument("--label-every", type=int, default=10, help="scene_1in10: every Nth image is labelled")
    p.add_argument("--results", default=str(DEFAULT_OUT), help="where results.json, results.md and the plots go")


def pairs(n: int, k: int, seed: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """n distinct pairs of disjoint k-class subsets."""
    rng = np.random.default_rng(seed)
    out: list = []
    while len(out) < n:
        perm = rng.permutation(len(CLASSES))
        a, b = tuple(sorted(perm[:k].tolist())), tuple(sorted(perm[k:2 * k].tolist()))
        if (a, b) not in out:
            out.append((a, b))
    return out


def scene_priors(scenario: str, a, b, args) -> tuple[np.ndarray, list[int]]:
    """The true class prior at each time (T×K) and where the scene changes abruptly."""
    k = len(CLASSES)
    ua, ub = np.zeros(k), np.zeros(k)
    ua[list(a)], ub[list(b)] = 1.0 / len(a), 1.0 / len(b)
    p = args.phase
    if scenario == "stationary":
        return np.tile(ua, (2 * p, 1)), []
    if scenario == "abrupt":
        return np.concatenate([np.tile(ua, (p, 1)), np.tile(ub, (p, 1))]), [p]
    if scenario == "return":
        q = 2 * p // 3
        return np.concatenate([np.tile(ua, (q, 1)), np.tile(ub, (q, 1)), np.tile(ua, (q, 1))]), [q, 2 * q]
    if scenario == "runs":
        rows = []
        for c in list(a) * 2:
            one = np.zeros(k)
            one[c] = 1.0
            rows.append(np.tile(one, (args.run, 1)))
        return np.concatenate(rows), [args.run * i for i in range(1, 2 * len(a))]
    if scenario == "gradual":
        t = np.arange(2 * p)
        alpha = np.sin(np.pi * t / (2 * p))[:, None]
        return (1 - alpha) * ua + alpha * ub, []
    raise ValueError(scenario)


def draw_stream(priors: np.ndarray, by_class: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Pool indices: each time's class drawn from its prior, then an image of that class not yet used."""
    order = [rng.permutation(ix) for ix in by_class]
    used = [0] * len(by_class)
    out = np.empty(len(priors), dtype=np.int64)
    for t, prior in enumerate(priors):
        c = int(rng.choice(len(prior), p=prior))
        if used[c] == len(order[c]):
            order[c], used[c] = rng.permutation(by_class[c]), 0
        out[t], used[c] = order[c][used[c]], used[c] + 1
    return out


def run_stream(probs: np.ndarray, y: np.ndarray, priors: np.ndarray, source: np.ndarray, confusion: np.ndarray,
               args) -> dict[str, np.ndarray]:
    """Every method's per-image correctness (T bools) on one stream of calibrated probabilities."""
    k, n, r, floor = len(source), len(probs), args.refresh, args.floor
    raw = probs.argmax(1)
    rows = likelihood_rows(probs, source)
    out = {"deployed": raw == y}

    def online(answer, update) -> np.ndarray:
        hit = np.empty(n, dtype=bool)
        for lo in range(0, n, r):
            hi = min(lo + r, n)
            hit[lo:hi] = answer(lo, hi) == y[lo:hi]
            update(lo, hi)
        return hit

    # today's daemon: a 1,024 window, 64 samples before the first estimate, the 0.2 gate
    tracker, held = PriorTracker(source, window=1024, min_samples=64), {"q": None}

    def window_answer(lo, hi):
        q = held["q"]
        if q is None or total_variation(q, source) < 0.2:
            return raw[lo:hi]
        return correct(probs[lo:hi], source, q, floor).argmax(1)

    def window_update(lo, hi):
        tracker.add(probs[lo:hi])
        held["q"] = tracker.estimate()

    out["window_em"] = online(window_answer, window_update)
    for name, make in (("fth", FollowTheHistory), ("flh_ftl", FlhFtl)):
        est = make(source, confusion)

        def pub_answer(lo, hi, est=est):
            q = est.estimate()
            return raw[lo:hi] if q is None else correct(probs[lo:hi], source, q, floor).argmax(1)

        out[name] = online(pub_answer, lambda lo, hi, est=est: est.update(raw[lo:hi]))
    applied = {}
    for name, every in (("scene", 0), ("scene_1in10", args.label_every)):
        corrector = OnlineCorrector(k, floor=floor)
        on = np.zeros(n, dtype=bool)

        def scene_answer(lo, hi, corrector=corrector, on=on, every=every):
            post = corrector.correct(rows[lo:hi])
            fixed = raw[lo:hi] if post is None else post.argmax(1)
            on[lo:hi] = corrector.state.applied
            if every:
                for i in range(lo, hi):
                    if i % every == every - 1:
                        corrector.spot_check(int(raw[i]), None if post is None else int(fixed[i - lo]), int(y[i]))
            return fixed if corrector.state.applied else raw[lo:hi]

        def scene_update(lo, hi, corrector=corrector):
            corrector.record(rows[lo:hi], raw[lo:hi], source)
            corrector.refresh(source)

        out[name] = online(scene_answer, scene_update)
        applied[name] = on
    q = em_prior(probs, source, max_iter=1000, tol=1e-7)
    out["batch_em"] = correct(probs, source, q, floor).argmax(1) == y
    oracle = probs * (np.maximum(priors, floor) / source)
    out["oracle"] = oracle.argmax(1) == y
    out["applied_scene"], out["applied_scene_1in10"] = applied["scene"], applied["scene_1in10"]
    return out


def recovery(curve_m: np.ndarray, curve_d: np.ndarray, change: int, end: int, tolerance: float = 0.02, smooth: int = 25) -> int:
    """Images after `change` until the method's top-1 (mean over streams, over the next `smooth` images) is
    within `tolerance` of the deployed model's and stays so for the rest of the phase."""
    diff = curve_m[change:end] - curve_d[change:end]
    if len(diff) < smooth:
        return 0
    moving = np.convolve(diff, np.ones(smooth) / smooth, mode="valid")
    bad = np.nonzero(moving < -tolerance)[0]
    return 0 if len(bad) == 0 else int(bad[-1] + 1)


def summarise(scenario: str, hits: list[dict], changes: list[int], length: int) -> dict:
    """Per method: mean top-1, worst window of 100 against deployed (mean over streams of each stream's
    worst; and of the subset-averaged curve, excluding the first 100 images after each change), recovery."""
    rows = {}
    curve = {m: np.mean([h[m] for h in hits], 0) for m in METHODS}
    windows = [(lo, lo + 100) for lo in range(0, length - 99, 100)]
    after = [(lo, hi) for lo, hi in windows if not any(c <= lo < c + 100 for c in changes)]
    bounds = changes + [length]
    for m in METHODS:
        per_stream_worst = np.mean([min(h[m][lo:hi].mean() - h["deployed"][lo:hi].mean() for lo, hi in windows) for h in hits])
        averaged = [curve[m][lo:hi].mean() - curve["deployed"][lo:hi].mean() for lo, hi in windows]
        averaged_after = [curve[m][lo:hi].mean() - curve["deployed"][lo:hi].mean() for lo, hi in after]
        rows[m] = {
            "top1": float(np.mean([h[m].mean() for h in hits])),
            "worst_window_stream": float(per_stream_worst),
            "worst_window": float(min(averaged)),
            "worst_window_after": float(min(averaged_after)),
            "recovery": [recovery(curve[m], curve["deployed"], c, e) for c, e in zip(changes, bounds[1:])],
        }
    for m in ("scene", "scene_1in10"):
        rows[m]["applied"] = float(np.mean([h[f"applied_{m}"].mean() for h in hits]))
    return {"scenario": scenario, "streams": len(hits), "length": length, "changes": changes, "methods": rows,
            "curve": {m: curve[m].tolist() for m in METHODS}}


def run_network(net: str, pools: ls.Pools, args) -> dict:
    model_dir = Path(args.out) / "models" / net
    model, info = ls.base_model(net, pools, args, model_dir)
    logits = ls.cached_logits(model, pools, model_dir)
    cal = fit_calibration(logits["held"], pools.held.labels, CalibrationMethod.TEMPERATURE)
    source = class_prior(pools.fit.labels, len(CLASSES))
    confusion = confusion_matrix(logits["held"].argmax(1).numpy(), pools.held.labels.numpy(), len(CLASSES))
    pool = cal.apply(torch.cat([logits["stream"], logits["score"]]).numpy())
    labels = torch.cat([pools.stream.labels, pools.score.labels]).numpy()
    by_class = [np.nonzero(labels == c)[0] for c in range(len(CLASSES))]
    results = []
    for si, scenario in enumerate(SCENARIOS):
        started = time.monotonic()
        hits, changes, length = [], [], 0
        for pi, (a, b) in enumerate(pairs(args.pairs, args.classes, args.seed + 100 * si)):
            priors, changes = scene_priors(scenario, a, b, args)
            idx = draw_stream(priors, by_class, np.random.default_rng([args.seed, si, pi]))
            hits.append(run_stream(pool[idx], labels[idx], priors, source, confusion, args))
            length = len(idx)
        results.append(summarise(scenario, hits, changes, length))
        log(f"{net} {scenario}: {len(hits)} streams in {time.monotonic() - started:.0f}s")
    return {"network": net, "base": info, "temperature": cal.temperature, "scenarios": results}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(results: list[dict], args) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['network']} @32 (base held-out top-1 {_pct(res['base']['held_out_top1'])}, T={res['temperature']:.2f})", "",
                  "Mean top-1 (%) per scenario; in brackets the worst window of 100 against deployed (points, subset-averaged "
                  "curve, excluding the first 100 images after a change); recovery: images after each change until within 2 "
                  "points of deployed (25-image moving mean).", "",
                  "| method | " + " | ".join(SCENARIOS) + " | recovery (abrupt; runs max; return) |", "|---|" + "---|" * (len(SCENARIOS) + 1)]
        by = {s["scenario"]: s for s in res["scenarios"]}
        for m in METHODS:
            cells = [f"{_pct(by[s]['methods'][m]['top1'])} ({100 * by[s]['methods'][m]['worst_window_after']:+.1f})" for s in SCENARIOS]
            rec = by["abrupt"]["methods"][m]["recovery"] + [max(by["runs"]["methods"][m]["recovery"])] + by["return"]["methods"][m]["recovery"]
            lines.append(f"| {m} | " + " | ".join(cells) + " | " + ", ".join(str(v) for v in rec) + " |")
        lines += ["", "Worst window of 100 against deployed, mean over streams of each stream's worst (points, first windows "
                  "after a change included); share of images answered corrected:", "",
                  "| method | " + " | ".join(SCENARIOS) + " |", "|---|" + "---|" * len(SCENARIOS)]
        for m in METHODS[1:6]:
            lines.append(f"| {m} | " + " | ".join(f"{100 * by[s]['methods'][m]['worst_window_stream']:+.1f}" for s in SCENARIOS) + " |")
        for m in ("scene", "scene_1in10"):
            lines.append(f"| {m} corrected | " + " | ".join(f"{_pct(by[s]['methods'][m]['applied'])} %" for s in SCENARIOS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(SCENARIOS), figsize=(4 * len(SCENARIOS), 3 * len(results)), squeeze=False, sharey=True)
    styles = {"deployed": ("k", "-"), "window_em": ("tab:orange", "-"), "fth": ("tab:green", ":"), "flh_ftl": ("tab:purple", "--"),
              "scene": ("tab:blue", "-"), "oracle": ("0.6", ":")}
    for row, res in zip(axes, results):
        for ax, sc in zip(row, res["scenarios"]):
            for m, (color, ls_) in styles.items():
                c = np.convolve(sc["curve"][m], np.ones(100) / 100, mode="valid")
                ax.plot(np.arange(len(c)) + 100, 100 * c, color=color, linestyle=ls_, linewidth=1.2, label=m)
            for ch in sc["changes"]:
                ax.axvline(ch, color="0.8", linewidth=0.8)
            ax.set_title(f"{res['network']}: {sc['scenario']}", fontsize=9)
            ax.set_xlabel("images", fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("top-1 % (last 100)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main(argv=None) -> None:
    args = ls.parse_args(argv, extend, description="Online label shift on changing CIFAR-10 traffic (issue 28).")
    started = time.monotonic()
    out, pools = ls.prepare(args)
    results = [run_network(net, pools, args) for net in args.networks]
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(finite({"config": vars(args), "results": results})) + "\n")
    text = report(results, args)
    (dest / "results.md").write_text(text + "\n")
    plot(results, dest / "online_shift.png")
    print(text)
    log(f"done in {time.monotonic() - started:.0f}s; wrote {dest}")


if __name__ == "__main__":
    main()
