"""Offline, on the demo's task: data-aware specialisation vs data-agnostic pruning at the same level.

The device only sees a few digit classes. edgetune's cycle (fine-tune first as in ADaPT, rank by
activation on the device's images, automatic level search, distillation retraining) uses the
device's camera images; the data-agnostic baseline prunes by L1 norm at the level the search
chose and retrains on the base model's all-class data. Each validates on a split of its own
training data; all are scored on held-out images of the device's classes that neither saw.
It reuses the live demo's base model (`<state dir>/base`, trained there on first use).

    python bench/demo_compare.py [--state-dir demo-state] [--classes 1,4,7] [--epochs 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from torch import nn

from prune_core import CycleConfig, ImageSet, ModelCard, TrainConfig, batches, pick_device, run_cycle, split_holdout
from prune_core.digits import base_model, digits, only, parse_classes
from prune_core.measure import count_macs, count_params, evaluate

from daemon.clients.demo import forward_ms


def score(model: nn.Module, card: ModelCard, held: ImageSet, seconds: float) -> dict:
    device = next(model.parameters()).device
    return {
        "top1_on_device_classes": evaluate(model, batches(held, 256, card.mean, card.std, device=device)).top1,
        "params": count_params(model),
        "macs": count_macs(model, card.input_size),
        "latency_ms": forward_ms(model, card.input_size),
        "seconds": seconds,
    }


def compare(state: Path, classes: list[int], level: str | float, epochs: int, base_epochs: int, device_name: str | None) -> dict:
    device = pick_device(device_name)
    data = digits()
    model, card, _ = base_model(state / "base", data, base_epochs, device)
    held = only(data.held, classes)
    local_train, local_val = split_holdout(only(data.camera, classes), 0.2, salt="demo-compare")
    all_train, all_val = split_holdout(data.base, 0.2, salt="demo-compare")
    train_cfg = TrainConfig(epochs=epochs, flip=False)
    print(f"device classes {classes}: {len(local_train)} camera images to train on, {len(held)} held out", flush=True)

    rows = {"served (unpruned)": score(model, card, held, 0.0)}
    t0 = time.monotonic()
    aware = run_cycle(
        model, card, local_train, local_val, CycleConfig(level=level, criterion="activation", finetune_before=1, train=train_cfg),
        on_probe=lambda p: print(f"probe level {p.level:.2f}: top1 {p.accuracy:.3f} feasible={p.feasible}", flush=True),
    )
    rows["data-aware (edgetune)"] = score(aware.model, card, held, time.monotonic() - t0)
    chosen = aware.summary["level"]
    if chosen > 0:
        t0 = time.monotonic()
        agnostic = run_cycle(model, card, all_train, all_val, CycleConfig(level=chosen, criterion="l1", train=train_cfg))
        rows[f"data-agnostic L1 @ {chosen:.2f}"] = score(agnostic.model, card, held, time.monotonic() - t0)

    print(f"\n{'model':<28}{'top1 (device classes)':>22}{'params':>12}{'MACs':>14}{'ms, 1 thread':>14}")
    for name, r in rows.items():
        print(f"{name:<28}{r['top1_on_device_classes']:>22.4f}{r['params']:>12,}{r['macs']:>14,}{r['latency_ms']:>14.2f}")
    print(f"\nlevel chosen by the search: {chosen:.2f}")
    return {"classes": classes, "level": chosen, "rows": rows, "probes": aware.summary["probes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", default="demo-state", help="where the demo's base model is (or is trained)")
    p.add_argument("--classes", default="1,4,7")
    p.add_argument("--level", default="auto", help="pruning level for the data-aware cycle, or 'auto'")
    p.add_argument("--epochs", type=int, default=3, help="retraining epochs per cycle")
    p.add_argument("--base-epochs", type=int, default=4, help="only when the base model must be trained")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    level = args.level if args.level == "auto" else float(args.level)
    result = compare(Path(args.state_dir), parse_classes(args.classes), level, args.epochs, args.base_epochs, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
