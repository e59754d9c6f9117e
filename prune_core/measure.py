"""Size and quality of a model: parameters, MACs, top-1 accuracy, agreement, peak memory."""
from __future__ import annotations

import copy
import resource
import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .tp_compat import tp


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one forward pass at input_size×input_size (batch 1)."""
    device = next(model.parameters()).device
    probe = copy.deepcopy(model).eval()
    macs, _ = tp.utils.count_ops_and_params(probe, torch.zeros(1, 3, input_size, input_size, device=device))
    return int(macs)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class Accuracy:
    """Top-1 over labelled samples, overall and per class index (correct, total)."""

    correct: int = 0
    total: int = 0
    per_class: dict[int, list[int]] = field(default_factory=dict)

    @property
    def top1(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        def name(i: int) -> str:
            return class_names[i] if class_names else str(i)

        return {
            "top1": self.top1,
            "correct": self.correct,
            "total": self.total,
            "per_class": {
                name(i): {"top1": c / t if t else None, "correct": c, "total": t}
                for i, (c, t) in sorted(self.per_class.items())
            },
        }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Accuracy:
    """Top-1 accuracy of `model` on the labelled samples of `batches` (unlabelled ones are skipped)."""
    was_training = model.training
    model.eval()
    acc = Accuracy()
    for x, y in batches:
        keep = y >= 0
        if not keep.any():
            continue
        pred = model(x[keep]).argmax(1)
        hit = (pred == y[keep]).cpu()
        for label, ok in zip(y[keep].cpu().tolist(), hit.tolist()):
            slot = acc.per_class.setdefault(label, [0, 0])
            slot[0] += int(ok)
            slot[1] += 1
        acc.correct += int(hit.sum())
        acc.total += int(keep.sum())
    model.train(was_training)
    return acc


@dataclass(frozen=True)
class Comparison:
    """`model` against `reference` on the same samples, labelled or not.

    `expected_loss` is the top-1 `model` loses against `reference` as `reference`'s own probabilities
    p see it: the mean of p(reference's answer) − p(model's answer). Where p is calibrated (a
    prior-corrected, temperature-scaled teacher) it estimates the true loss without a label; a
    disagreement counts only as much as the reference believes in its own answer over the model's."""

    agreement: float  # share of samples answered alike
    expected_loss: float
    expected_loss_se: float  # its standard error (the per-sample terms' spread / sqrt(n))
    samples: int


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Comparison:
    states = (model.training, reference.training)
    model.eval()
    reference.eval()
    same, terms = 0, []
    for x, _ in batches:
        mine, p = model(x).argmax(1), torch.softmax(reference(x).double(), 1)
        theirs = p.argmax(1)
        same += int((mine == theirs).sum())
        terms.append(p.gather(1, theirs[:, None]).squeeze(1) - p.gather(1, mine[:, None]).squeeze(1))
    model.train(states[0])
    reference.train(states[1])
    if not terms:
        return Comparison(float("nan"), float("nan"), float("nan"), 0)
    d = torch.cat(terms)
    se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return Comparison(same / len(d), float(d.mean()), se, len(d))


def agreement(model: nn.Module, reference: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of samples (labelled or not) on which `model` predicts what `reference` predicts."""
    return compare(model, reference, batches).agreement


@torch.no_grad()
def latency_ms(model: nn.Module, input_size: int, runs: int = 30, batch: int = 1) -> float:
    """Median wall time of one forward pass at batch `batch`, in milliseconds (after warm-up)."""
    import time

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, 3, input_size, input_size, device=device)
    times = []
    for i in range(runs + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return sorted(times)[len(times) // 2]
