"""Wiring: every component built from Settings, started and stopped together, and the public
methods the API calls (it never reaches into the scheduler or the stores)."""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from prune_core.card import ModelFormatError
from prune_core.device import device_name
from prune_core.imagedecode import decode_array
from prune_core.options import check_cycle_options

from .serving.batcher import Batcher, BatchSettings, Result
from .storage.buffer import DropReason, NewSample, SampleBuffer, Stored
from .ops.config import Settings
from .cycles.cycle_records import CycleStore
from .cycles.gate import Gate
from .serving.installer import Installer
from .ops.metrics import Metrics
from .storage.model_store import ModelStore, UnknownVersion
from .serving.prior_adapter import PriorAdapter, PriorSettings
from .serving.drift import Appeared, DriftSettings
from .workers.engine_rebuild import EngineRebuilder
from .serving.generalist import GeneralistWatch, load_logits
from .cycles.recovery import recover_interrupted
from .cycles.scheduler import Clock, Conflict, Scheduler
from .serving.serving import Answer, ModelHolder, Served
from .ops.status_view import status_document
from .workers.supervisor import WorkerSupervisor, WorkerTarget
from .ops.telemetry import make_provider

log = logging.getLogger("edgetune")

__all__ = ["Runtime", "StartupError", "NotFound", "Conflict"]


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


class NotFound(LookupError):
    """No such cycle or model version."""


class Runtime:
    def __init__(self, settings: Settings, import_model: Path | None = None, *,
                 worker_target: WorkerTarget | None = None, clock: Clock = time.time):
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.device = device_name(settings.device)  # a name: torch is imported only if it serves
        self.metrics = Metrics()
        self.store = ModelStore(settings.models_dir, settings.keep_versions)
        self.store.remove_stale(protect=set(self.store.versions()))
        if not self.store.versions():
            if import_model is None:
                raise StartupError(f"no model in {settings.models_dir}: start once with --model DIR to import one")
            try:
                version = self.store.import_model(import_model)
            except (ModelFormatError, OSError) as exc:
                raise StartupError(f"cannot import --model {import_model}: {exc}") from None
            self.store.set_active(version)
        self.holder = ModelHolder()
        self.prior = PriorAdapter(PriorSettings.from_settings(settings))  # the device's traffic: outlives every swap
        self.installer = Installer(self.store, self.holder, self.metrics, self.device, self.prior,
                                   settings.serving_backend, settings.serving_threads)
        self.rebuilder = self.installer.rebuilder = EngineRebuilder(
            self.installer, self.metrics, settings.buffer_path, settings.worker_nice, settings.serving_threads)
        self._load_first_model()
        self.buffer = SampleBuffer(settings.buffer_path, settings.buffer_max_rows, settings.buffer_max_bytes, settings.holdout_fraction,
                                   background_limit=settings.sample_queue_size)
        self._replay_prior()
        self.batcher = Batcher(BatchSettings.from_settings(settings), on_batch=self.metrics.inference_batch.observe)
        self.provider = make_provider(settings.telemetry, settings.simulated_telemetry)
        self.gate = Gate(settings)
        self.cycles = CycleStore(settings.cycles_dir)
        recover_interrupted(self.cycles, self.installer, settings.checkpoints_dir)
        self.scheduler = Scheduler(settings, self.buffer, self.cycles, self.installer, self.gate, self.provider,
                                   self.metrics, WorkerSupervisor(worker_target), clock)
        generalist = self.store.generalist()
        self.generalist = None if generalist is None else GeneralistWatch(
            generalist, self.store.path(generalist), DriftSettings(
                settings.generalist_fallback, settings.drift_sample_every, appear_share=settings.drift_appear_share,
                trained_share=settings.drift_trained_share),
            on_appeared=self._fall_back, logits=partial(
                load_logits, self.store.path(generalist), settings.serving_backend, self.device))

    def _load_first_model(self) -> None:
        """The active version, or, if it will not load, the newest version that does."""
        active = self.store.active()
        candidates = ([active] if active else []) + self.store.last_good(exclude={active} if active else set())
        for version in candidates:
            try:
                self.installer.install(version, pointer_optional=True)
            except (ModelFormatError, OSError, RuntimeError) as exc:
                log.error("model %s does not load: %s", version, exc)
                continue
            if version != active:
                log.warning("falling back to model %s (active was %s)", version, active)
            return
        raise StartupError(f"no loadable model version in {self.store.dir}")

    def _replay_prior(self) -> None:
        """Rebuild the class-prior estimate from the buffer's latest answers (a restart keeps it)."""
        served = self.holder.current
        if served is None:
            return
        k = len(served.assumes.source)
        answers = [(np.frombuffer(row, dtype=np.float32), pred, label) for row, pred, label in self.buffer.recent_answers(self.settings.prior_window)
                   if len(row) == 4 * k]
        if answers:
            self.prior.replay(served.assumes, np.stack([a[0] for a in answers]), np.asarray([a[1] for a in answers]), [a[2] for a in answers])
            log.info("class prior rebuilt from the buffer's latest %d answers", len(answers))

    def start_request_path(self) -> None:
        """The threads /infer needs: the buffer's writer and the batcher."""
        self.buffer.start()
        self.batcher.start()

    def start(self) -> None:
        self.start_request_path()
        self.scheduler.start()
        if self.generalist is not None:
            self.generalist.start()

    def stop(self) -> None:
        if self.generalist is not None:
            self.generalist.stop()
        self.scheduler.stop()
        self.rebuilder.stop()
        self.batcher.stop()
        self.buffer.close()
        self.provider.close()

    # ---- serving and samples --------------------------------------------------------------
    def served(self) -> Served | None:
        """The model being served (None only before the first load)."""
        return self.holder.current

    def note_inference(self, latency_s: float, model: Served, image: Any, answer: Answer, label: int | None) -> None:
        """An inference was answered: the gate counts traffic, the metrics its latency; a labelled
        one is a spot check of the prior correction; the generalist watch may look at the image."""
        self.metrics.inference_latency.observe(latency_s)
        self.gate.note_request()
        if label is not None:
            self.prior.spot_check(answer.raw_pred, answer.corrected_pred, label)
        if self.generalist is not None:
            self.generalist.offer(model.version, model.card, image)

    def _fall_back(self, appeared: Appeared) -> None:
        """The generalist saw classes the served specialist was not trained for: serve it again."""
        if self.generalist is not None:
            if self.scheduler.fall_back(self.generalist.version, f"{appeared.describe()} (generalist's estimate)") is not None:
                self.prior.new_scene()  # the specialist's answers could not see the new classes: estimate afresh

    async def answer(self, model: Served, data: bytes) -> Result:
        """An uploaded image decoded to the model's input and answered, batched with concurrent
        requests (DataError when it does not decode, batcher.InferenceError when the forward pass
        fails). Decoding runs off the event loop, in the thread that hands the image to the batcher."""
        return await self.batcher.answer(model, partial(decode_array, data, model.card.preprocess))

    def _count_ingested(self, done: Future) -> None:
        if done.exception() is None and not done.result().duplicate:
            self.metrics.samples_ingested.labels(source="infer").inc()

    def submit_sample(self, sample: NewSample) -> Future:
        """Buffer a sample seen by /infer durably: the future resolves once it is committed."""
        future = self.buffer.submit(sample)
        future.add_done_callback(self._count_ingested)
        return future

    def queue_sample(self, sample: NewSample) -> bool:
        """Hand a sample seen by /infer to the group commit behind the answer; False when the
        queue is full and the sample is dropped (counted). StorageError at once only when the state
        directory is read-only; a commit that fails later counts the sample as dropped."""
        future = self.buffer.offer(sample)
        if future is None:
            self.metrics.samples_dropped.labels(reason=DropReason.QUEUE_FULL.value).inc()
            return False

        def count(done: Future) -> None:
            if done.exception() is not None:
                self.metrics.samples_dropped.labels(reason=DropReason.STORAGE_ERROR.value).inc()
            else:
                self._count_ingested(done)

        future.add_done_callback(count)
        return True

    def add_samples(self, samples: list[NewSample]) -> list[Stored]:
        """Bulk ingest, all or nothing (StorageError when the disk refuses)."""
        stored = self.buffer.add_many(samples)
        self.metrics.samples_ingested.labels(source="ingest").inc(sum(not x.duplicate for x in stored))
        return stored

    def label_sample(self, sample_id: int, label: int) -> bool:
        """False when no such sample is buffered. A pending candidate that asked for this label is judged again."""
        found = self.buffer.set_label(sample_id, label)
        if found:
            self.scheduler.labelled(sample_id)
        return found

    def sample_image(self, sample_id: int) -> tuple[bytes, str]:
        """A buffered sample's image and media type (NotFound when it is not buffered)."""
        found = self.buffer.image(sample_id)
        if found is None:
            raise NotFound(f"no buffered sample {sample_id} (never stored, or evicted)")
        return found

    def disagreements(self, cycle_id: str) -> dict:
        """A cycle's asked disagreements with their labels so far and its state (NotFound for an unknown cycle)."""
        record = self.cycles.get(cycle_id)
        if record is None:
            raise NotFound(f"no cycle '{cycle_id}'")
        asked = record.evidence.get("asked", [])
        labels = self.buffer.labels_of([int(d["key"]) for d in asked])
        names = self.served().card.class_names if self.served() is not None else []
        name = lambda i: names[i] if i is not None and 0 <= i < len(names) else (None if i is None else str(i))  # noqa: E731
        return {
            "cycle_id": record.id, "state": record.state.value, "reason": record.reason,
            "judging_samples": record.evidence.get("samples"), "disagreements": record.evidence.get("disagreements"),
            "classes": list(names),
            "asked": [{"sample_id": int(d["key"]), "image_url": f"/samples/{int(d['key'])}/image",
                       "teacher": name(d["teacher"]), "candidate": name(d["candidate"]),
                       "label": name(labels.get(int(d["key"])))} for d in asked],
        }

    # ---- cycles -----------------------------------------------------------------------------
    def request_cycle(self, level: Any = None, criterion: str | None = None, allocation: str | None = None,
                      epochs: int | None = None, force: bool = False) -> dict:
        """Queue a cycle; options left out take the configured ones. ValueError names a bad
        option, Conflict says which cycle is already active."""
        s = self.settings
        criterion = criterion or s.cycle_criterion
        allocation = allocation or s.cycle_allocation
        level = check_cycle_options(level if level is not None else s.cycle_level, criterion, allocation)
        epochs = epochs if epochs is not None else s.cycle_epochs
        return self.scheduler.request(level, criterion, allocation, epochs, force).to_dict()

    def list_cycles(self, limit: int | None = None) -> list[dict]:
        """Newest first."""
        return [r.to_dict() for r in self.cycles.list(limit)]

    def cycle(self, cycle_id: str) -> dict:
        record = self.cycles.get(cycle_id)
        if record is None:
            raise NotFound(f"no cycle '{cycle_id}'")
        return record.to_dict()

    def cycle_folder(self, cycle_id: str) -> Path:
        """Where a known cycle's record and report live (NotFound for any other id)."""
        record = self.cycles.get(cycle_id)
        if record is None:
            raise NotFound(f"no cycle '{cycle_id}'")
        return self.cycles.folder(record)

    # ---- models -----------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """Stored versions, newest first."""
        serving = self.holder.current.version if self.holder.current else None
        out = []
        for version in reversed(self.store.versions()):
            card = self.store.card(version)
            out.append({"version": version, "active": version == serving, "arch": card.arch, "params": card.params,
                        "macs": card.macs, "input_size": card.input_size, "num_classes": card.num_classes,
                        "lineage": card.lineage.__dict__})
        return out

    def activate(self, version: str) -> Served:
        """Serve a stored version. ValueError: not a version name; NotFound: no such version;
        Conflict: a cycle is active, or the version cannot be served."""
        try:
            self.store.path(version)
        except UnknownVersion as exc:
            raise ValueError(str(exc.args[0])) from None
        if version not in self.store.versions():
            raise NotFound(f"no model version '{version}'")
        try:
            return self.scheduler.activate(version)
        except Conflict:
            raise
        except Exception as exc:
            raise Conflict(f"version {version} cannot be served: {exc}") from None

    # ---- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        """The /status document (reads the buffer's stats: call it off the event loop)."""
        return status_document(model=self.holder.current, buffer_stats=self.buffer.stats(), view=self.scheduler.view(), prior=self.prior,
                               settings=self.settings, gate=self.gate, provider_name=self.provider.name,
                               now=self.scheduler.clock(), generalist=self.generalist, rebuild=self.rebuilder.view())

    def metrics_text(self) -> bytes:
        return self.metrics.render()
