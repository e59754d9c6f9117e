"""Training and retraining on local samples: cross-entropy where labels exist plus knowledge
distillation from a teacher (the unpruned model), so unlabelled traffic is usable too.

Held-out early stopping keeps the best epoch (top-1, ties to the later epoch); patience runs out only
when neither top-1 nor the held-out loss improves. When it fires, the run does not end at once: it cools
down, the lr decaying from where it is to zero over a tenth of the schedule (at least one epoch; the
schedule's own end if that comes first). Cut at once, a run keeps the weights of a noisy epoch at a
high lr; finishing the schedule instead would cost small device buffers, stretched to many epochs
by `min_steps`, most of their time. The measurements behind this rule are in bench/RESULTS.md.

A `should_continue` callback is called after every batch: returning False stops cleanly (best
weights so far restored); blocking in it pauses.
`on_step` is told after every optimizer step what share of the run is done (a channel fade uses it).

`TrainConfig.scope` says which parameters train (prune_core.scope): all of them, or the last stages
and/or the cheap ones, with no graph kept for a frozen front. With the last stages only, the frozen
front runs apart in `front_chunks` micro-batches (prune_core.front), its batch-norm statistics
re-estimated on the training images first; the teacher and the held-out passes run at the
micro-batch size too, so no pass at the whole batch without a graph sets the run's peak memory.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSet, batches
from .front import FrontSplit, split_front, whole_because
from .options import DEFAULT_LAST_SHARE, RetrainScope, parse_last_share, parse_scope
from .schedule import schedule
from .scope import Frozen, ScopePlan, plan_scope
from .state_dict import load_tensors


@dataclass
class TrainConfig:
    """Hyper-parameters of one (re)training run; the defaults suit fine-tuning a pruned model."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    distill_weight: float = 0.5  # share of the KD term on labelled samples; unlabelled use KD only
    temperature: float = 4.0
    patience: int = 3  # epochs without held-out improvement before stopping (second half of the schedule only)
    cooldown: float = 0.1  # share of the schedule (at least one epoch) over which an early stop anneals the lr to 0; 0: stop at once
    seed: int = 0
    augment: bool = True
    flip: bool = True  # horizontal flips (off for digits and text)
    min_steps: int = 0  # run more epochs than `epochs` if needed to take at least this many SGD steps
    scope: RetrainScope = RetrainScope.FULL  # which parameters train (prune_core.scope)
    last_share: float = DEFAULT_LAST_SHARE  # share of the weight layers, at the end, that the last-stages scopes train
    front_chunks: int = 4  # micro-batches a frozen front runs in (scope last; 1: with the rest, at the whole batch)
    # Each step's gradient is scaled down to at most this norm (None: never). A rare batch the model
    # is badly wrong on can give a gradient thousands of times the usual one, and one such step
    # throws a fine-tuned network to chance; typical steps are well under it and untouched.
    max_grad_norm: float | None = 10.0

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
        if not 0.0 <= self.distill_weight <= 1.0 or self.temperature <= 0:
            raise ValueError("distill_weight must be in [0, 1] and temperature > 0")
        if not 0.0 <= self.cooldown <= 1.0:
            raise ValueError("cooldown must be in [0, 1]")
        self.scope = parse_scope(self.scope)
        self.last_share = parse_last_share(self.last_share)
        if self.front_chunks < 1:
            raise ValueError("front_chunks must be >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError("max_grad_norm must be > 0 (or None: no clipping)")


@dataclass
class TrainProgress:
    epoch: int
    batch: int
    batches_per_epoch: int
    loss: float


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_score: float  # held-out top-1 (labelled) or agreement with the teacher (unlabelled)
    val_loss: float  # the training objective on the held-out split
    lr: float
    seconds: float


@dataclass
class TrainResult:
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("nan")
    stopped: bool = False  # the callback asked to stop
    early_stop_epoch: int | None = None  # the epoch after which early stopping fired (the cool-down follows)
    seconds: float = 0.0
    plan: ScopePlan | None = None  # which parameters trained
    front: str = ""  # how the frozen front ran: apart (where the cut is), or whole and why
    clipped_steps: int = 0  # steps whose gradient was scaled down to max_grad_norm


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, config: TrainConfig
) -> torch.Tensor:
    """(1−α)·CE on labelled rows + α·T²·KL(teacher‖student) on them; T²·KL alone on unlabelled rows."""
    labelled = labels >= 0
    per_row = torch.zeros(logits.shape[0], device=logits.device)
    if teacher_logits is not None:
        t = config.temperature
        kd = F.kl_div(
            F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="none", log_target=True
        ).sum(1) * (t * t)
        per_row = per_row + torch.where(labelled, config.distill_weight * kd, kd)
        ce_weight = 1.0 - config.distill_weight
    else:
        ce_weight = 1.0
    if labelled.any():
        ce = F.cross_entropy(logits[labelled], labels[labelled], reduction="none")
        per_row = per_row.index_add(0, torch.nonzero(labelled).flatten(), ce_weight * ce)
    used = labelled | torch.tensor(teacher_logits is not None, device=logits.device)
    return per_row[used].mean() if used.any() else logits.sum() * 0.0


def _chunked(model: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`model(x)` without a graph, in micro-batches of `chunk` (eval mode: the same answer)."""
    with torch.no_grad():
        return torch.cat([model(part) for part in x.split(chunk)])


def _front(model: nn.Module, plan: ScopePlan, train_set: ImageSet, mean, std, config: TrainConfig, device) -> FrontSplit | str:
    """The frozen front run apart (its batch-norm statistics re-estimated on `train_set`), or why not."""
    why_not = whole_because(plan, config.front_chunks)
    if why_not:  # no batch to decode, no probe: a full run pays nothing here
        return why_not
    frozen = Frozen(model, plan)
    try:
        stream = lambda: (x for x, _ in batches(train_set, config.batch_size, mean, std, device=device))  # noqa: E731
        found = split_front(model, plan, next(stream()), config.front_chunks)
        if isinstance(found, FrontSplit):
            found.recalibrate(stream())
        return found
    finally:
        frozen.release()


@torch.no_grad()
def _held_out(model: nn.Module, teacher_logits: list[torch.Tensor] | None, val_batches: Callable, config: TrainConfig) -> tuple[float, float]:
    """(score, loss) on the held-out split, in one pass: top-1 on its labelled samples, or agreement
    with the teacher where none is labelled; the training objective's mean over the samples it uses."""
    was_training = model.training
    model.eval()
    correct = labelled = agree = rows = 0
    loss_sum = 0.0
    for i, (x, y) in enumerate(val_batches()):
        logits = model(x)
        t_logits = teacher_logits[i] if teacher_logits is not None else None
        pred, known = logits.argmax(1), y >= 0
        correct += int((pred[known] == y[known]).sum())
        labelled += int(known.sum())
        used = x.shape[0] if t_logits is not None else int(known.sum())  # the rows distillation_loss averages over
        if used:
            loss_sum += float(distillation_loss(logits, y, t_logits, config)) * used
            rows += used
        if t_logits is not None:
            agree += int((pred == t_logits.argmax(1)).sum())
    model.train(was_training)
    return (correct / labelled if labelled else agree / rows), loss_sum / rows


def _cool(optimizer: torch.optim.Optimizer, cooling: tuple[int, int, float], step: int) -> None:
    """Cosine decay of the lr from its value when early stopping fired to 0 at the end of the cool-down."""
    began, length, lr = cooling
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - began) / length)))


def _changing_state(model: nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
    """A copy of what training changes: the trainable parameters and every buffer (batch-norm
    statistics move in frozen layers too); a partial scope does not pay for a copy of the frozen rest."""
    params = {name for name, _ in model.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or k not in params}


def train(
    model: nn.Module,
    train_set: ImageSet,
    val_set: ImageSet | None,
    mean: Sequence[float],
    std: Sequence[float],
    config: TrainConfig,
    teacher: nn.Module | None = None,
    should_continue: Callable[[TrainProgress], bool] | None = None,
    progress: bool = False,
    on_step: Callable[[float], None] | None = None,
) -> TrainResult:
    """Train `model` in place; returns the history. Deterministic on CPU for a given seed."""
    if teacher is None and train_set.labelled == 0:
        raise ValueError("training needs labelled samples or a teacher model to distil from")
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    result = TrainResult()
    started = time.monotonic()
    if config.epochs == 0 or len(train_set) == 0:
        return result
    if teacher is not None:
        teacher.eval()
    result.plan = plan_scope(model, config.scope, config.last_share)
    trainable = set(result.plan.trainable)
    params = [p for name, p in model.named_parameters() if name in trainable]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True,
    )
    epochs, per_epoch = schedule(len(train_set), config.batch_size, config.epochs, config.min_steps)  # small device buffers need more passes
    total_steps = max(1, epochs * per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15, anneal_strategy="cos"
    )
    steps = 0
    # The held-out split judges only if it can: labelled samples, or a teacher to agree with.
    judged = val_set is not None and len(val_set) > 0 and (val_set.labelled > 0 or teacher is not None)
    found = _front(model, result.plan, train_set, mean, std, config, device)
    split = found if isinstance(found, FrontSplit) else None
    result.front = split.describe() if split is not None else found
    forward = split if split is not None else model
    # the passes without a graph (held-out, teacher) at the training batch size, or a split front's micro-batch:
    # larger, they would set a partial run's peak memory
    chunk = split.chunk if split is not None else config.batch_size
    val_batches = (lambda: batches(val_set, chunk, mean, std, device=device)) if judged else None
    teacher_logits = None  # the teacher is fixed: its held-out answers are computed once, where they count
    if judged and teacher is not None and (config.distill_weight > 0 or val_set.labelled < len(val_set)):
        with torch.no_grad():
            teacher_logits = [teacher(x) for x, _ in val_batches()]
    best_state = _changing_state(model, trainable)
    best, lowest_loss = _held_out(model, teacher_logits, val_batches, config) if judged else (float("-inf"), float("inf"))
    result.best_score, since_best = best, 0
    bar = tqdm(total=epochs * per_epoch, disable=None if progress else True, desc="train", unit="batch", leave=False)
    cooling: tuple[int, int, float] | None = None  # (step it began at, its length in steps, lr then) once early stopping fired
    last_epoch, epoch = epochs, 0
    frozen = Frozen(model, result.plan)  # released in the `finally` below
    try:
        while epoch < last_epoch:
            epoch += 1
            epoch_start = time.monotonic()
            model.train()
            losses = []
            stream = batches(
                train_set, config.batch_size, mean, std, shuffle=True, augment=config.augment,
                flip=config.flip, seed=config.seed * 1000 + epoch, device=device,
            )
            for i, (x, y) in enumerate(stream):
                if x.shape[0] < 2:  # batch norm cannot train on a single sample
                    continue
                # the teacher is only asked where its answer counts: unlabelled rows, or any row when distilling labelled ones
                ask = teacher is not None and (config.distill_weight > 0 or bool((y < 0).any()))
                t_logits = _chunked(teacher, x, chunk) if ask else None
                loss = distillation_loss(forward(x), y, t_logits, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    result.clipped_steps += int(norm > config.max_grad_norm)
                optimizer.step()
                steps += 1
                if cooling is None:
                    scheduler.step()
                else:
                    _cool(optimizer, cooling, steps)
                if on_step is not None:
                    on_step(min(1.0, steps / total_steps))
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
                if should_continue is not None and not should_continue(TrainProgress(epoch, i + 1, per_epoch, losses[-1])):
                    result.stopped = True
                    break
            score, val_loss = _held_out(model, teacher_logits, val_batches, config) if judged else (float("nan"), float("nan"))
            result.history.append(
                EpochLog(epoch, sum(losses) / max(1, len(losses)), score, val_loss, optimizer.param_groups[0]["lr"], time.monotonic() - epoch_start)
            )
            # The epoch kept is the best on held-out top-1, a tie going to the later epoch (trained
            # longer, at a lower lr): a small split saturates (the demo's 37 digits scored 1.0 from the
            # first retrained epoch on). Ties broken by the held-out loss kept high-lr epochs over
            # cooled-down ones: cross-entropy rises as a model grows confident while its top-1 holds.
            # Patience counts epochs in which neither top-1 nor the loss reached a new best: on a few
            # dozen images per class top-1 moves in coarse steps and stalls while the loss still falls.
            since_best = 0 if not judged or score > best or val_loss < lowest_loss else since_best + 1
            lowest_loss = min(lowest_loss, val_loss)
            if not judged or score >= best:
                best = score
                best_state = _changing_state(model, trainable)
                result.best_epoch, result.best_score = epoch, score
            if result.stopped:
                break
            # Early stopping only in the second half: with a one-cycle schedule the held-out score
            # often dips while the learning rate is high and recovers as it anneals.
            if result.early_stop_epoch is None and judged and since_best >= config.patience and epoch >= epochs / 2:
                result.early_stop_epoch = epoch
                if config.cooldown == 0:
                    break
                tail = max(1, round(config.cooldown * epochs))
                if epoch + tail < epochs:  # else the schedule's own annealing ends as soon
                    cooling, last_epoch = (steps, tail * per_epoch, optimizer.param_groups[0]["lr"]), epoch + tail
                    bar.total = steps + tail * per_epoch
                    bar.refresh()
    finally:
        frozen.release()
        bar.close()
    load_tensors(model, best_state, strict=False)  # what it lacks, the frozen parameters, did not change
    model.eval()
    result.seconds = time.monotonic() - started
    return result
