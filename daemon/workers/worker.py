"""The cycle worker: a separate, lower-priority process that runs one prune-retrain cycle on a
snapshot of the buffer and reports through a queue of typed events (daemon/workers/events.py). It never
touches the served model or the active pointer; an accepted candidate is written to a staging
directory for the daemon to install.

Control: a shared integer the daemon sets to a `Control` value; the worker checks it between
steps, after every training batch and between the steps of an engine build (pausing blocks there,
so resuming continues where it was).
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import time
import traceback
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable

from prune_core.options import DEFAULT_JUDGE_SHARE, DEFAULT_LAST_SHARE, DEFAULT_PRUNE_STEPS, Recipe, RetrainScope

from ..cycles.acceptance import Acceptance, decide
from .child_process import start_child
from .events import AbortedEvent, FailedEvent, ProbeEvent, ProgressEvent, ResultEvent, StepEvent
from ..cycles.report import LossCurve, channels_kept


class Control(IntEnum):
    """What the daemon tells the worker, through a shared integer."""

    RUN = 0
    PAUSE = 1
    ABORT = 2


class Aborted(Exception):
    pass


def obey(control, poll_s: float = 0.05) -> None:
    """Block while the daemon says PAUSE; raise Aborted when it says ABORT."""
    while control.value == Control.PAUSE:
        time.sleep(poll_s)
    if control.value == Control.ABORT:
        raise Aborted()


@dataclass
class CycleJob:
    cycle_id: str
    buffer_path: str
    model_dir: str
    served_version: str
    staging_dir: str
    max_sample_id: int
    level: Any
    criterion: str
    allocation: str
    epochs: int
    finetune_before: int
    tolerance: float
    batch_size: int
    min_steps: int
    hflip: bool
    max_accuracy_drop: float
    min_size_gain: float
    device: str | None
    nice: int
    memory_limit_mb: int | None = None
    seed: int = 0
    min_agreement: float = 0.99
    min_label_evidence: int = 200
    acceptance_confidence: float = 0.95
    disagreement_labels: int = 100  # disagreements a pending candidate asks labels for (Acceptance.max_asked)
    judge_share: float = DEFAULT_JUDGE_SHARE  # share of the held-out samples kept to judge the candidate only (data.split_judging)
    target_prior: list | None = None  # the traffic's estimated class prior while answers are corrected to it: the teacher is
    # then corrected to the prior of the samples it trains on (EM on the served model's outputs over them, from this)
    prior_floor: float = 1e-3
    memory_budget_mb: int | None = None  # the predicted peak must fit: the batch size is chosen for it (daemon/cycles/cycle_cost.py)
    retrain_scope: RetrainScope = RetrainScope.FULL
    retrain_last_share: float = DEFAULT_LAST_SHARE
    engine_backends: tuple = ()  # Backend values to build engines for, for an accepted candidate
    serving_threads: int | None = None
    recipe: Recipe = Recipe.CLASSIC
    distil_budget_s: float = 0.0  # training seconds of the patient recipe (0: `epochs` per step)
    prune_steps: int = DEFAULT_PRUNE_STEPS
    checkpoint_dir: str | None = None  # where the cycle's training keeps resumable checkpoints (removed when it ends)
    checkpoint_s: float = 30.0
    recent_half_life: float | None = None  # samples back from the newest at which a sample weighs half in training


def train_config(job: CycleJob):
    """The TrainConfig of a cycle's training runs: the patient recipe (over `distil_budget_s`, else `epochs`),
    or the classic one."""
    from prune_core.retrain import TrainConfig, patient

    config = TrainConfig(epochs=job.epochs, batch_size=job.batch_size, min_steps=job.min_steps, flip=job.hflip, seed=job.seed,
                         scope=job.retrain_scope, last_share=job.retrain_last_share, checkpoint_every_s=job.checkpoint_s,
                         recent_half_life=job.recent_half_life)
    return patient(config, job.distil_budget_s or None) if job.recipe is Recipe.PATIENT else config


def close_enough(rule: Acceptance, corrected: bool):
    """A label-free level walk's judge (prune_core.cycle.CloseEnough): the acceptance rule's verdict on a
    step's comparison with the teacher, its size gain left to the final verdict."""
    closeness = replace(rule, min_gain=0.0)

    def judge(comparison, params_before: int, params_after: int) -> bool:
        summary = {"params_before": params_before, "params_after": params_after, "top1_before": float("nan"),
                   "top1_after": float("nan"), "evidence": "agreement", "agreement_with_before": comparison.agreement,
                   "expected_loss": comparison.expected_loss, "expected_loss_se": comparison.expected_loss_se,
                   "held_out_samples": comparison.samples, "held_out_labelled": 0, "teacher": {"corrected": corrected}}
        return decide(summary, closeness)[0]

    return judge


def build_candidate_engines(model, card, staging_dir: str, held_out_images, job: CycleJob,
                            between: Callable[[], None] | None = None) -> list:
    """Build and verify (against torch, on the held-out samples) the engines of an accepted
    candidate in its staging directory, so the swap only has to load them. Each backend's outcome
    (engine or reason) goes into the cycle record; only `between` (the worker's pause and abort
    check, called between build steps) raises."""
    from ..engines import Backend
    from ..engines.build import build_engines

    return build_engines(model, card, staging_dir, held_out_images, backends=[Backend(b) for b in job.engine_backends],
                         between=between, threads=job.serving_threads)


def judge_candidate(candidate, teacher, card, train_set, held_set, judging, job: CycleJob):
    """The paired evidence of the candidate against the teacher on the judging samples
    (prune_core.judging), the teacher's calibration checked on every labelled sample of the snapshot
    (it learnt from none of them), at most `job.disagreement_labels` disagreements asked."""
    import torch

    from prune_core import ImageSet
    from prune_core.judging import judge_pairs

    labelled = ImageSet.concat([s.subset(torch.nonzero(s.labels >= 0).flatten()) for s in (train_set, held_set)])
    return judge_pairs(candidate, teacher, judging, labelled, card.mean, card.std, job.batch_size,
                       job.disagreement_labels, job.seed)


def _limit_memory(megabytes: int | None) -> None:
    if megabytes is not None:
        limit = megabytes * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
            or "cannot allocate memory" in text or "can't allocate memory" in text or "failed to map segment" in text)


def run_worker(job: CycleJob, control, events) -> None:
    """Process entry point (spawned): runs `job`, obeys `control`, puts events on `events`."""
    parent = os.getppid()
    start_child(job.nice)  # a restart never finds an orphan still training into a staging directory
    started = time.monotonic()
    curve = LossCurve()  # sent with the final event, for the cycle report

    post = events.put
    watch = None  # the cycle's cost, measured from the end of its profile: also for a failed or aborted cycle
    post(StepEvent("start"))  # starts the queue's feeder thread before the memory limit applies
    _limit_memory(job.memory_limit_mb)

    def check() -> None:
        if os.getppid() != parent:  # the daemon is gone (where PR_SET_PDEATHSIG is unavailable)
            os._exit(1)
        if control.value == Control.RUN:
            return
        waited = time.monotonic()
        try:
            obey(control)
        finally:
            if watch is not None:
                watch.paused(time.monotonic() - waited)

    try:
        import torch

        from prune_core import (
            CycleConfig, ImageSet, decode_image, load_model, pick_device, run_cycle, save_model, split_judging,
        )
        from prune_core.model_format import channel_plan
        from prune_core.teacher import corrected_teacher, samples_prior

        from ..storage.buffer import read_snapshot
        from ..cycles.cycle_cost import predict_cost

        torch.manual_seed(job.seed)
        device = pick_device(job.device)
        post(StepEvent("snapshot"))
        model, card = load_model(job.model_dir, device)
        train_parts, held_parts = ([], [], []), ([], [], [])
        for sample_id, image, label, _pred, holdout in read_snapshot(Path(job.buffer_path), job.max_sample_id):
            try:
                tensor = decode_image(image, card.preprocess)
            except ValueError:
                continue
            part = held_parts if holdout else train_parts
            part[0].append(tensor)
            part[1].append(label if label is not None else -1)
            part[2].append(str(sample_id))
        if not train_parts[0] or not held_parts[0]:
            raise ValueError(f"snapshot has {len(train_parts[0])} training and {len(held_parts[0])} held-out samples; need both")

        def as_set(p) -> ImageSet:
            return ImageSet(torch.stack(p[0]), torch.tensor(p[1], dtype=torch.long), p[2])

        train_set, held_set = as_set(train_parts), as_set(held_parts)
        choosing, judging = split_judging(held_set, job.judge_share)
        post(StepEvent("rank", {"train_samples": len(train_set), "held_out_samples": len(held_set)}))
        check()

        def should_continue(progress) -> bool:
            post(ProgressEvent(progress.epoch, progress.batch, progress.batches_per_epoch, progress.loss))
            curve.add(progress.epoch, progress.batch, progress.loss)
            check()
            return True

        config = CycleConfig(
            level=job.level, criterion=job.criterion, allocation=job.allocation, finetune_before=job.finetune_before,
            tolerance=job.tolerance, train=train_config(job), prune_steps=job.prune_steps,
        )
        if job.target_prior is not None:  # correction pays on this traffic: correct to the prior of the samples trained on
            job.target_prior = samples_prior(model, card, train_set, init=job.target_prior)
        teacher = corrected_teacher(model, card, job.target_prior, job.prior_floor)
        # beside run_cycle's copies, the served model is held where the teacher is its corrected twin
        config, watch = predict_cost(job, teacher.model, card, train_set, held_set, config, int(teacher.corrected), post)
        result = run_cycle(
            teacher.model, teacher.student_card, train_set, choosing, config, should_continue=should_continue,
            on_probe=lambda p: post(ProbeEvent(p.to_dict())), parent=job.served_version, clock=watch.clock, judge_set=judging,
            close_enough=close_enough(Acceptance.of(job), teacher.corrected),
            # the patient recipe's long runs resume after a restart; a few epochs of the classic one just run again
            checkpoints=job.checkpoint_dir if job.recipe is Recipe.PATIENT else None,
        )
        post(watch.measured())
        watch = None
        result.summary["teacher"] = {"corrected": teacher.corrected, "note": teacher.note,
                                     "prior": dict(zip(card.class_names, job.target_prior)) if teacher.corrected else None}
        check()
        post(StepEvent("validate"))
        evidence = judge_candidate(result.model, teacher.model, card, train_set, held_set,
                                   judging if judging is not None else choosing, job)
        decision = decide(result.summary, Acceptance.of(job), evidence)
        accepted, reason = decision
        engines = []
        if accepted or decision.pending:  # a pending candidate is kept in staging until its labels decide
            post(StepEvent("write"))
            check()
            save_model(result.model, result.card, job.staging_dir)
        if accepted:
            if job.engine_backends:
                post(StepEvent("engines", {"backends": list(job.engine_backends)}))
                engines = build_candidate_engines(result.model, result.card, job.staging_dir, held_set.images, job, check)
        post(ResultEvent(accepted, reason, result.summary, time.monotonic() - started, curve.points,
                         channels_kept(card.channel_plan, channel_plan(result.model)), engines, decision.pending, evidence))
    except Aborted:
        if watch is not None:
            post(watch.measured(complete=False))
        post(AbortedEvent("aborted while running", curve.points))
    except Exception as exc:  # reported, never raised: the server records the failure
        reason = f"{type(exc).__name__}: {exc}"
        if _out_of_memory(exc):
            reason = f"out of memory (cycle_memory_limit_mb={job.memory_limit_mb}): {reason}"
        if watch is not None:
            post(watch.measured(complete=False))
        post(FailedEvent(reason, traceback.format_exc(limit=8), curve.points))


__all__ = ["CycleJob", "Control", "obey", "run_worker", "decide"]
