"""The protocol's report from results.csv: results.md (mean top-1 per network, level and method, the gain of
the best data-aware method over the data-agnostic baseline and its distance to the ceiling, by subset size
too) and accuracy_vs_level.png."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .results import DATA_AWARE, METHODS, PICKED


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


def config_line(args: argparse.Namespace) -> str:
    """The recipe of a run, in one sentence under the report's title."""
    n_f = args.finetune_epochs
    return (
        f"Budget {args.epochs} epochs per method (data-aware: fine-tune n_f={n_f} + retrain n_r={args.epochs - n_f}); "
        f"base models {args.base_epochs} epochs; {args.per_class or 'all'} images per class before the 80/20 split"
        f"{f' (scored on the held-out images of the first {args.test_per_class})' if args.test_per_class else ''}"
        f"{f', base model and agnostic baseline on the first {args.base_per_class}' if args.base_per_class else ''}"
        f"{f'; input {args.image_size}x{args.image_size}' if args.image_size else ''}; "
        f"peak lr {args.lr}; {args.allocation} allocation; distillation weight {args.distill_weight}; data-aware methods "
        f"{'with' if args.augment else 'without'} augmentation, ceiling and agnostic with or without, as validation picks; seed {args.seed}."
    )


def write_report(out: Path, recipe: str) -> str:
    """results.md from results.csv, under the title and `recipe` (config_line); the text is returned too."""
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    info = summarise(rows)
    table, sizes = info["table"], info["sizes"]
    lines = [
        "# ADaPT protocol (arXiv 2006.08554) on CIFAR-10, small scale",
        "",
        recipe,
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
