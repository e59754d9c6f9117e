"""Dynamic batching (as Triton does): concurrent /infer requests run through the model together.

Each request is handed once to the batcher's thread pool, which prepares (decodes) its image and
queues it (model bundle, image, future). The pool thread that then finds no forward pass running
leads: it takes the first queued image, gathers more until `max_batch` are waiting or
`max_queue_delay_ms` has passed (0: only those already waiting, so a lone request never waits),
answers them with one forward pass per model bundle, and repeats until the queue is empty. Images
queued meanwhile by other pool threads join the leader's next pass. So a lone request costs one hand-off
from the event loop and one wake-up back, and no thread idles waiting for work. A batch never mixes
bundles: a request keeps the `Served` it started with across a hot-swap. With `max_batch = 1`
every pool thread runs its own image's forward pass, as before batching existed.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .serving import Answer, Served

log = logging.getLogger("edgetune")


class InferenceError(RuntimeError):
    """The forward pass failed; every request of the batch gets it (the API answers 500)."""


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 1
    max_queue_delay_s: float = 0.0

    @classmethod
    def from_settings(cls, settings) -> "BatchSettings":
        return cls(settings.max_batch, settings.max_queue_delay_ms / 1000)


@dataclass(frozen=True)
class Result:
    """A request's prepared image (uint8 3×S×S) and its answer."""

    image: np.ndarray
    answer: Answer


@dataclass
class _Request:
    served: Served
    image: np.ndarray  # uint8 3×S×S
    future: Future


class Batcher:
    """`answer(served, prepare)` for one image; batches concurrent callers when max_batch > 1."""

    def __init__(self, settings: BatchSettings, on_batch: Callable[[int], None] = lambda n: None,
                 run: Callable[[Served, np.ndarray], list[Answer]] = lambda served, images: served.predict(images)):
        self.s = settings
        self._on_batch = on_batch  # metrics: the size of each forward pass
        self._run = run
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._leading = threading.Lock()  # held by the pool thread running forward passes
        self._pool: ThreadPoolExecutor | None = None

    @property
    def batching(self) -> bool:
        return self.s.max_batch > 1

    @property
    def waiting(self) -> int:
        """Prepared images waiting for a forward pass."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(thread_name_prefix="infer")

    def stop(self) -> None:
        """Answers every request already submitted, then ends the pool's threads."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    async def answer(self, served: Served, prepare: Callable[[], np.ndarray]) -> Result:
        """The answer for the uint8 image 3×S×S that `prepare()` returns (a decoder, say, whose
        exceptions propagate); InferenceError when the forward pass fails."""
        return await asyncio.wrap_future(self.submit(served, prepare))

    def submit(self, served: Served, prepare: Callable[[], np.ndarray]) -> Future:
        """Hand one request to the pool; the future resolves to its `Result`."""
        done: Future = Future()
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("not started")
            pool.submit(self._serve, served, prepare, done)
        except RuntimeError:  # not started, stopped, or shut down since the check
            done.set_exception(InferenceError("the batcher is not running (the daemon is stopping)"))
        return done

    def _serve(self, served: Served, prepare: Callable[[], np.ndarray], done: Future) -> None:
        """In a pool thread: prepare the image, then answer it (without batching), or queue it and
        lead forward passes while no other thread does."""
        if not done.set_running_or_notify_cancel():  # cancelled before it ran; once running it cannot be,
            return  # so setting its result never fails and never stops a batch halfway
        try:
            image = prepare()
            if not self.batching:
                done.set_result(Result(image, self._forward(served, [image])[0]))
                return
        except BaseException as exc:
            done.set_exception(exc)
            return
        self._queue.put(_Request(served, image, done))
        # An image queued while the leader was finishing is seen here, after its release.
        while not self._queue.empty() and self._leading.acquire(blocking=False):
            try:
                while self._lead_once():
                    pass
            finally:
                self._leading.release()

    def _forward(self, served: Served, images: list[np.ndarray]) -> list[Answer]:
        self._on_batch(len(images))
        try:
            answers = self._run(served, np.stack(images))
        except Exception as exc:
            raise InferenceError(f"inference failed on model {served.version}: {exc}") from exc
        if len(answers) != len(images):
            raise InferenceError(f"model {served.version} gave {len(answers)} answers for {len(images)} images")
        return answers

    def _gather(self) -> list[_Request]:
        """The first queued request and those that join it (empty when none is queued)."""
        try:
            batch = [self._queue.get_nowait()]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.s.max_queue_delay_s
        while len(batch) < self.s.max_batch:
            wait = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _lead_once(self) -> bool:
        """Answer one gathered batch, one forward pass per model bundle; False when none was queued."""
        batch = self._gather()
        groups: list[tuple[Served, list[_Request]]] = []  # one forward pass per model bundle, in arrival order
        for req in batch:
            for served, members in groups:
                if served is req.served:
                    members.append(req)
                    break
            else:
                groups.append((req.served, [req]))
        for served, members in groups:
            try:
                answers = self._forward(served, [r.image for r in members])
            except Exception as exc:  # every waiting request gets the error; the pool lives on
                log.error("%s", exc)
                for r in members:
                    r.future.set_exception(exc)
                continue
            for r, a in zip(members, answers):
                r.future.set_result(Result(r.image, a))
        return bool(batch)
