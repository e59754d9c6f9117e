"""A fast stand-in for the cycle worker, with its signature `(job, control, events)`: no torch, no
training. It sends the events the real worker sends, obeys pause and abort after every "batch",
decides with the real acceptance rule on a made-up summary (params shrink by the requested level),
and writes an accepted candidate by copying the served model. `job.epochs` is its number of
batches; FOREVER (the API's largest value) runs until aborted, so a test never races the end of a
cycle. An empty snapshot fails as the real worker does. Its cost prediction goes through the real
budget rule (daemon/cycles/cycle_cost.choose) on made-up profiles: 507 MiB + 2 MiB per sample with full
retraining, 480 MiB + 1 MiB per sample with a cheaper scope (its own, as the real worker profiles each)."""
from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

from daemon.cycles.cycle_cost import CostWatch, CycleRefused, choose, fallback_scopes
from daemon.workers.events import AbortedEvent, FailedEvent, ProgressEvent, ResultEvent, StepEvent
from daemon.cycles.acceptance import Acceptance, decide
from daemon.workers.worker import Aborted, CycleJob, obey
from prune_core.cost_records import CyclePlan, MemorySource, Phase, Profile, ProfileSample

BATCH_S = 0.002
PARAMS = 100_000
FOREVER = 1000


def fake_profile(scope: str) -> Profile:
    fixed, per_sample = (507, 2) if scope == "full" else (480, 1)
    return Profile(tuple(ProfileSample(b, fixed + per_sample * b, 0.1 + 0.01 * b, per_sample * b, 1.0) for b in (8, 16)),
                   256, 2.0, 0.001, 10.0, MemorySource.RSS, "cpu", 0.5, scope)


def fake_worker(job: CycleJob, control, events, engines=None) -> None:
    events.put(StepEvent("start"))
    if job.max_sample_id == 0:
        events.put(FailedEvent("ValueError: snapshot has 0 training and 0 held-out samples; need both"))
        return
    events.put(StepEvent("rank", {"train_samples": job.max_sample_id}))
    try:
        scopes = fallback_scopes(job.retrain_scope) if job.memory_budget_mb is not None else [job.retrain_scope]
        choose(map(fake_profile, scopes), CyclePlan(job.max_sample_id, 4, job.epochs, extra_models=0), job, events.put)
    except CycleRefused as exc:
        events.put(FailedEvent(f"CycleRefused: {exc}"))
        return
    watch = CostWatch(None, time.monotonic())
    curve = []
    try:
        batches = itertools.count(1) if job.epochs >= FOREVER else range(1, job.epochs + 1)
        with watch.clock.timing(Phase.RETRAIN):
            for batch in batches:
                obey(control, poll_s=0.005)
                loss = 1.0 / batch
                curve.append([batch, 1, 1, loss])
                events.put(ProgressEvent(1, batch, job.epochs, loss))
                time.sleep(BATCH_S)
        obey(control, poll_s=0.005)
    except Aborted:
        events.put(watch.measured(complete=False))  # what the real worker reports of an aborted cycle
        events.put(AbortedEvent("aborted while running", curve))
        return
    level = 0.5 if job.level == "auto" else float(job.level)
    summary = {"params_before": PARAMS, "params_after": int(PARAMS * (1 - level)), "macs_before": 10 * PARAMS,
               "macs_after": int(10 * PARAMS * (1 - level)), "top1_before": 0.9, "top1_after": 0.9,
               "top1_ceiling": float("nan"), "agreement_with_before": 1.0, "level": level,
               "retrain_scope": job.retrain_scope.value,
               "retrain_plan": {"scope": job.retrain_scope.value, "last_share": job.retrain_last_share}}
    accepted, reason = decide(summary, Acceptance.of(job))
    events.put(watch.measured())
    if accepted:
        events.put(StepEvent("write"))
        for name in ("model.json", "weights.safetensors"):
            shutil.copyfile(Path(job.model_dir) / name, Path(job.staging_dir) / name)
    try:
        built = engines(job, control) if accepted and engines is not None else []
    except Aborted:
        events.put(AbortedEvent("aborted while running", curve))
        return
    events.put(ResultEvent(accepted, reason, summary, 0.0, curve, [], built))


def _build_engines(job: CycleJob, control) -> list:
    """What the real worker does after writing an accepted candidate: build its engines in the
    staging directory (daemon.workers.worker.build_candidate_engines), verified on the held-out samples of
    the snapshot, obeying pause and abort between the build's steps. Imports torch: only the
    workers below use it."""
    import numpy as np

    from daemon.storage.buffer import read_snapshot
    from daemon.workers.worker import build_candidate_engines
    from prune_core import load_model
    from prune_core.imagedecode import decode_array

    model, card = load_model(job.staging_dir)
    held = [decode_array(image, card.preprocess)
            for _id, image, _label, _pred, holdout in read_snapshot(Path(job.buffer_path), job.max_sample_id) if holdout]
    images = np.stack(held) if held else np.zeros((0, 3, card.input_size, card.input_size), np.uint8)
    return build_candidate_engines(model, card, job.staging_dir, images, job, lambda: obey(control, poll_s=0.005))


def fake_worker_building_engines(job: CycleJob, control, events) -> None:
    """The fake worker, but an accepted candidate gets its engines built as by the real worker."""
    fake_worker(job, control, events, engines=_build_engines)


def fake_worker_engine_build_fails(job: CycleJob, control, events) -> None:
    """As fake_worker_building_engines, with every engine build forced to fail (EngineBuildError)."""
    from daemon.engines import EngineBuildError, build

    def refuse(*args, **kwargs):
        raise EngineBuildError("forced by the test: the builder refuses")

    build._build_engine = refuse  # the one builder build_engine and build_engines both call
    fake_worker(job, control, events, engines=_build_engines)


def fake_worker_disagreeing(job: CycleJob, control, events) -> None:
    """A stand-in whose candidate answers class 1 where the (corrected) teacher answers class 0 on every
    held-out sample of the snapshot, with an expected loss too high to accept without labels: the real
    acceptance rule then keeps it pending, asking for the labels of those samples (in snapshot order)."""
    from daemon.storage.buffer import read_snapshot
    from prune_core.evidence import Disagreement, JudgingEvidence

    events.put(StepEvent("start"))
    held = [sample_id for sample_id, _image, _label, _pred, holdout in read_snapshot(Path(job.buffer_path), job.max_sample_id) if holdout]
    evidence = JudgingEvidence(len(held), len(held), 0.5, 0.01, asked=tuple(Disagreement(str(i), 0, 1) for i in held[:job.disagreement_labels]))
    summary = {"params_before": PARAMS, "params_after": PARAMS // 2, "macs_before": 10 * PARAMS, "macs_after": 5 * PARAMS,
               "top1_before": float("nan"), "top1_after": float("nan"), "agreement_with_before": 0.0, "evidence": "agreement",
               "expected_loss": 0.5, "expected_loss_se": 0.01, "teacher": {"corrected": True}, "level": 0.5}
    decision = decide(summary, Acceptance.of(job), evidence)
    if decision.accepted or decision.pending:
        for name in ("model.json", "weights.safetensors"):
            shutil.copyfile(Path(job.model_dir) / name, Path(job.staging_dir) / name)
    events.put(ResultEvent(decision.accepted, decision.reason, summary, 0.0, [], [], [], decision.pending, evidence))
