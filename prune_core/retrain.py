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

The patient recipe (`patient`, function matching: Beyer et al., CVPR 2022) distils with AdamW, a
warm-up and cosine decay, every batch mixed (prune_core.mixing) and the teacher asked on the same
mixed view; its length is a time budget (`budget_s`, training seconds, pauses not counted), turned
into steps after the first epoch. With a `checkpoint` path the run writes its state (weights,
optimizer, step, best weights, history) there atomically at epoch ends and resumes from it when
started again with the same settings on the same data, e.g. after the process was killed.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSet, batches
from .atomic import atomic_write
from .front import FrontSplit, split_front, whole_because
from .mixing import Mix, Mixed, mix_batch
from .options import DEFAULT_LAST_SHARE, RetrainScope, parse_last_share, parse_scope
from .schedule import schedule
from .scope import Frozen, ScopePlan, plan_scope
from .state_dict import load_tensors


class Optimizer(str, Enum):
    SGD = "sgd"  # Nesterov momentum under a one-cycle schedule
    ADAMW = "adamw"  # decoupled weight decay, linear warm-up then cosine decay to zero

    def __str__(self) -> str:
        return self.value


class KdLoss(str, Enum):
    KL = "kl"  # T²·KL(teacher‖student) at `temperature`
    MSE = "mse"  # mean squared error between the logits

    def __str__(self) -> str:
        return self.value


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
    optimizer: Optimizer = Optimizer.SGD
    mix: Mix = Mix.NONE  # mixup or CutMix on every batch, the teacher asked on the mixed view
    mix_alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    kd_loss: KdLoss = KdLoss.KL
    warmup: float = 0.05  # AdamW: share of the steps the lr rises linearly over
    budget_s: float | None = None  # training seconds (pauses not counted): sets the steps after the first epoch
    checkpoint_every_s: float = 30.0  # with a checkpoint path: the longest time between two writes (at epoch ends)
    # Recent traffic weighs more: each epoch draws its samples (with replacement) with a weight halving every
    # this many samples back from the newest, the training set being in arrival order (None: every sample once)
    recent_half_life: float | None = None

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
        self.optimizer, self.mix, self.kd_loss = Optimizer(self.optimizer), Mix(self.mix), KdLoss(self.kd_loss)
        if self.mix_alpha <= 0 or not 0.0 <= self.warmup < 1.0:
            raise ValueError("mix_alpha must be > 0 and warmup in [0, 1)")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError("budget_s must be > 0 (or None: the run is `epochs` long)")
        if self.recent_half_life is not None and not self.recent_half_life > 0:
            raise ValueError("recent_half_life must be > 0 (or None: every sample once per epoch)")


def patient(config: TrainConfig, budget_s: float | None) -> TrainConfig:
    """`config` turned into the patient, consistent distillation recipe (function matching): AdamW
    with warm-up and cosine decay, mixup on every batch over the crop and flip, MSE on the logits
    (KL at temperature 1 with `kd_loss`), no early stopping (the held-out split still picks the epoch
    kept), `budget_s` seconds long (None: `epochs` long)."""
    return replace(config, optimizer=Optimizer.ADAMW, lr=1e-3, weight_decay=1e-4, mix=Mix.MIXUP, mix_alpha=1.0,
                   kd_loss=KdLoss.MSE, temperature=1.0, augment=True, patience=10**6, cooldown=0.0, budget_s=budget_s)


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
    steps: int = 0  # optimizer steps taken (all of them, resumed ones included)
    resumed_epoch: int = 0  # the epoch a checkpoint resumed the run after (0: it started afresh)


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, config: TrainConfig,
    mixed: Mixed | None = None,
) -> torch.Tensor:
    """(1−α)·CE on labelled rows + α·KD(teacher, student) on them; KD alone on unlabelled rows. KD is
    T²·KL(teacher‖student) or the logits' mean squared error (`config.kd_loss`). On a mixed batch a
    row is labelled where both its images are, its CE mixed by the same lam."""
    labelled = labels >= 0
    if mixed is not None:
        labelled = labelled & labelled[mixed.partner]
    per_row = torch.zeros(logits.shape[0], device=logits.device)
    if teacher_logits is not None:
        if config.kd_loss is KdLoss.MSE:
            kd = (logits - teacher_logits).pow(2).mean(1)
        else:
            t = config.temperature
            kd = F.kl_div(
                F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="none", log_target=True
            ).sum(1) * (t * t)
        per_row = per_row + torch.where(labelled, config.distill_weight * kd, kd)
        ce_weight = 1.0 - config.distill_weight
    else:
        ce_weight = 1.0
    if labelled.any():
        rows = torch.nonzero(labelled).flatten()
        ce = F.cross_entropy(logits[rows], labels[rows], reduction="none")
        if mixed is not None and mixed.lam < 1.0:
            ce = mixed.lam * ce + (1 - mixed.lam) * F.cross_entropy(logits[rows], labels[mixed.partner[rows]], reduction="none")
        per_row = per_row.index_add(0, rows, ce_weight * ce)
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


def recent_draw(data: ImageSet, half_life: float | None, seed: int) -> ImageSet:
    """An epoch's samples: `data` itself, or as many drawn with replacement, the weight of a sample halving
    every `half_life` samples before the newest (the last row)."""
    if half_life is None or len(data) == 0:
        return data
    age = torch.arange(len(data) - 1, -1, -1, dtype=torch.float64)
    picked = torch.multinomial(0.5 ** (age / half_life), len(data), replacement=True, generator=torch.Generator().manual_seed(seed))
    return data.subset(picked)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on the weights only (not on biases and normalisation parameters)."""
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    if config.optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """The AdamW runs' lr factor before step `step` + 1 of `total`: linear from 0 over `warmup` of the
    steps, then cosine decay to 0."""
    rise = max(1, round(warmup * total))
    if step < rise:
        return (step + 1) / rise
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - rise) / max(1, total - rise))))


def _fingerprint(model: nn.Module, train_set: ImageSet, val_set: ImageSet | None, config: TrainConfig) -> str:
    """What a checkpoint must match to be resumed: the settings, the parameter shapes and the samples."""
    text = repr((sorted((k, str(v)) for k, v in asdict(config).items() if k != "checkpoint_every_s"),
                 [(k, tuple(v.shape)) for k, v in model.state_dict().items()],
                 train_set.keys, len(train_set), None if val_set is None else val_set.keys))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class _Run:
    """The mutable state of a run, the unit a checkpoint saves and restores."""

    epoch: int = 0
    steps: int = 0
    total_steps: int = 0
    last_epoch: int = 0
    best: float = float("-inf")
    lowest_loss: float = float("inf")
    since_best: int = 0
    cooling: tuple[int, int, float] | None = None  # (step it began at, its length in steps, lr then) once early stopping fired
    budget_set: bool = False  # the budget has turned into steps


def _save(path: Path, key: str, run: _Run, model: nn.Module, optimizer, scheduler, best_state, result: TrainResult) -> None:
    state = {"key": key, "run": asdict(run), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None, "best_state": best_state,
             "history": [asdict(h) for h in result.history], "best_epoch": result.best_epoch, "best_score": result.best_score,
             "early_stop_epoch": result.early_stop_epoch, "clipped_steps": result.clipped_steps,
             "rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load(path: Path, key: str) -> dict | None:
    """The checkpoint at `path` if it is this run's (same fingerprint), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: never unpickle code
    except Exception:  # a torn or foreign file: start afresh
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


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
    checkpoint: str | Path | None = None,
) -> TrainResult:
    """Train `model` in place; returns the history. Deterministic on CPU for a given seed (without a
    time budget). With `checkpoint`, resumable from the last epoch end saved (module docstring)."""
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
    path = Path(checkpoint) if checkpoint is not None else None
    key = _fingerprint(model, train_set, val_set, config) if path is not None else ""
    result.plan = plan_scope(model, config.scope, config.last_share)
    trainable = set(result.plan.trainable)
    params = [p for name, p in model.named_parameters() if name in trainable]
    optimizer = _optimizer(params, config)
    epochs, per_epoch = schedule(len(train_set), config.batch_size, config.epochs, config.min_steps)  # small device buffers need more passes
    run = _Run(total_steps=max(1, epochs * per_epoch), last_epoch=epochs)
    scheduler = None
    if config.optimizer is Optimizer.SGD and config.budget_s is None:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=run.total_steps, pct_start=0.15, anneal_strategy="cos"
        )
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
    saved = _load(path, key) if path is not None else None
    if saved is not None:
        run = _Run(**{**saved["run"], "cooling": tuple(saved["run"]["cooling"]) if saved["run"]["cooling"] else None})
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        best_state = saved["best_state"]
        result.history = [EpochLog(**h) for h in saved["history"]]
        result.best_epoch, result.best_score = saved["best_epoch"], saved["best_score"]
        result.early_stop_epoch, result.clipped_steps = saved["early_stop_epoch"], saved["clipped_steps"]
        result.resumed_epoch = run.epoch
        torch.set_rng_state(saved["rng"])
    else:
        best_state = _changing_state(model, trainable)
        run.best, run.lowest_loss = _held_out(model, teacher_logits, val_batches, config) if judged else (float("-inf"), float("inf"))
        result.best_score = run.best
    last_saved = time.monotonic()
    bar = tqdm(total=run.last_epoch * per_epoch, initial=run.steps, disable=None if progress else True, desc="train", unit="batch", leave=False)
    frozen = Frozen(model, result.plan)  # released in the `finally` below
    try:
        while run.epoch < run.last_epoch:
            run.epoch += 1
            epoch = run.epoch
            epoch_start = time.monotonic()
            active = 0.0  # this epoch's training seconds, the callback's (a pause) left out
            model.train()
            losses = []
            stream = batches(
                recent_draw(train_set, config.recent_half_life, config.seed * 1000 + epoch), config.batch_size, mean, std,
                shuffle=True, augment=config.augment, flip=config.flip, seed=config.seed * 1000 + epoch, device=device,
            )
            mixing = np.random.default_rng((config.seed, epoch))
            for i, (x, y) in enumerate(stream):
                if x.shape[0] < 2:  # batch norm cannot train on a single sample
                    continue
                t0 = time.monotonic()
                mixed = mix_batch(x, config.mix, config.mix_alpha, mixing) if config.mix is not Mix.NONE else None
                if mixed is not None:
                    x = mixed.x
                # the teacher is only asked where its answer counts: unlabelled rows, or any row when distilling labelled ones
                ask = teacher is not None and (config.distill_weight > 0 or bool((y < 0).any()))
                t_logits = _chunked(teacher, x, chunk) if ask else None  # the same (mixed) view the student sees
                loss = distillation_loss(forward(x), y, t_logits, config, mixed)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    result.clipped_steps += int(norm > config.max_grad_norm)
                if scheduler is None and run.cooling is None:
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * warmup_cosine(run.steps, run.total_steps, config.warmup)
                optimizer.step()
                run.steps += 1
                if run.cooling is not None:
                    _cool(optimizer, run.cooling, run.steps)
                elif scheduler is not None:
                    scheduler.step()
                if on_step is not None:
                    on_step(min(1.0, run.steps / run.total_steps))
                losses.append(loss.item())
                active += time.monotonic() - t0
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
                if should_continue is not None and not should_continue(TrainProgress(epoch, i + 1, per_epoch, losses[-1])):
                    result.stopped = True
                    break
                if run.budget_set and run.steps >= run.total_steps:
                    break
            t0 = time.monotonic()
            score, val_loss = _held_out(model, teacher_logits, val_batches, config) if judged else (float("nan"), float("nan"))
            active += time.monotonic() - t0
            result.history.append(
                EpochLog(epoch, sum(losses) / max(1, len(losses)), score, val_loss, optimizer.param_groups[0]["lr"], time.monotonic() - epoch_start)
            )
            if config.budget_s is not None and not run.budget_set and not result.stopped and losses:
                # the budget in steps, at the first epoch's pace (its held-out pass included)
                run.budget_set = True
                run.total_steps = max(run.steps, round(config.budget_s * len(losses) / max(active, 1e-6)))
                run.last_epoch = max(epoch, math.ceil(run.total_steps / per_epoch))
                bar.total = run.total_steps
                bar.refresh()
            # The epoch kept is the best on held-out top-1, a tie going to the later epoch (trained
            # longer, at a lower lr): a small split saturates (the demo's 37 digits scored 1.0 from the
            # first retrained epoch on). Ties broken by the held-out loss kept high-lr epochs over
            # cooled-down ones: cross-entropy rises as a model grows confident while its top-1 holds.
            # Patience counts epochs in which neither top-1 nor the loss reached a new best: on a few
            # dozen images per class top-1 moves in coarse steps and stalls while the loss still falls.
            run.since_best = 0 if not judged or score > run.best or val_loss < run.lowest_loss else run.since_best + 1
            run.lowest_loss = min(run.lowest_loss, val_loss)
            if not judged or score >= run.best:
                run.best = score
                best_state = _changing_state(model, trainable)
                result.best_epoch, result.best_score = epoch, score
            if result.stopped:
                break
            # Early stopping only in the second half: with a one-cycle schedule the held-out score
            # often dips while the learning rate is high and recovers as it anneals.
            if result.early_stop_epoch is None and judged and run.since_best >= config.patience and epoch >= run.last_epoch / 2:
                result.early_stop_epoch = epoch
                if config.cooldown == 0:
                    break
                tail = max(1, round(config.cooldown * run.last_epoch))
                if epoch + tail < run.last_epoch:  # else the schedule's own annealing ends as soon
                    run.cooling, run.last_epoch = (run.steps, tail * per_epoch, optimizer.param_groups[0]["lr"]), epoch + tail
                    bar.total = run.steps + tail * per_epoch
                    bar.refresh()
            if path is not None and (time.monotonic() - last_saved >= config.checkpoint_every_s or run.epoch >= run.last_epoch):
                _save(path, key, run, model, optimizer, scheduler, best_state, result)
                last_saved = time.monotonic()
        if path is not None and not result.stopped and run.epoch < run.last_epoch:  # ended early: a resume ends at once too
            run.last_epoch = run.epoch
            _save(path, key, run, model, optimizer, scheduler, best_state, result)
    finally:
        frozen.release()
        bar.close()
    load_tensors(model, best_state, strict=False)  # what it lacks, the frozen parameters, did not change
    model.eval()
    result.steps = run.steps
    result.seconds = time.monotonic() - started
    return result
