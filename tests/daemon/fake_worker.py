"""A fast stand-in for the cycle worker, with its signature `(job, control, events)`: no torch, no
training. It sends the events the real worker sends, obeys pause and abort after every "batch",
decides with the real acceptance rule on a made-up summary (params shrink by the requested level),
and writes an accepted candidate by copying the served model. `job.epochs` is its number of
batches; FOREVER (the API's largest value) runs until aborted, so a test never races the end of a
cycle. An empty snapshot fails as the real worker does."""
from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

from daemon.events import AbortedEvent, FailedEvent, ProgressEvent, ResultEvent, StepEvent
from daemon.acceptance import Acceptance, decide
from daemon.worker import Aborted, CycleJob, obey

BATCH_S = 0.002
PARAMS = 100_000
FOREVER = 1000


def fake_worker(job: CycleJob, control, events) -> None:
    events.put(StepEvent("start"))
    if job.max_sample_id == 0:
        events.put(FailedEvent("ValueError: snapshot has 0 training and 0 held-out samples; need both"))
        return
    events.put(StepEvent("rank", {"train_samples": job.max_sample_id}))
    curve = []
    try:
        batches = itertools.count(1) if job.epochs >= FOREVER else range(1, job.epochs + 1)
        for batch in batches:
            obey(control, poll_s=0.005)
            loss = 1.0 / batch
            curve.append([batch, 1, 1, loss])
            events.put(ProgressEvent(1, batch, job.epochs, loss))
            time.sleep(BATCH_S)
        obey(control, poll_s=0.005)
    except Aborted:
        events.put(AbortedEvent("aborted while running", curve))
        return
    level = 0.5 if job.level == "auto" else float(job.level)
    summary = {"params_before": PARAMS, "params_after": int(PARAMS * (1 - level)), "macs_before": 10 * PARAMS,
               "macs_after": int(10 * PARAMS * (1 - level)), "top1_before": 0.9, "top1_after": 0.9,
               "top1_ceiling": float("nan"), "agreement_with_before": 1.0, "level": level,
               "retrain_scope": job.retrain_scope.value}
    accepted, reason = decide(summary, Acceptance.of(job))
    if accepted:
        events.put(StepEvent("write"))
        for name in ("model.json", "weights.safetensors"):
            shutil.copyfile(Path(job.model_dir) / name, Path(job.staging_dir) / name)
    events.put(ResultEvent(accepted, reason, summary, 0.0, curve, []))
