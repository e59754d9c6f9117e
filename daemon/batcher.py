"""Dynamic batching (as Triton does): concurrent /infer requests run through the model together.

Requests queue (model bundle, image, future); one thread takes the first, gathers more until
`max_batch` are waiting or `max_queue_delay_ms` has passed (0: only those already waiting, so a
lone request never waits), and answers them with one forward pass per model bundle. A batch never
mixes bundles: a request keeps the `Served` it started with across a hot-swap. With
`max_batch = 1` there is no thread: each request runs its own forward pass in the thread pool, as
before batching existed.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
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


@dataclass
class _Request:
    served: Served
    image: np.ndarray  # uint8 3×S×S
    future: Future


class Batcher:
    """`answer(served, image)` for one image; batches concurrent callers when max_batch > 1."""

    def __init__(self, settings: BatchSettings, on_batch: Callable[[int], None] = lambda n: None,
                 run: Callable[[Served, np.ndarray], list[Answer]] = lambda served, images: served.predict(images)):
        self.s = settings
        self._on_batch = on_batch  # metrics: the size of each forward pass
        self._run = run
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def batching(self) -> bool:
        return self.s.max_batch > 1

    def start(self) -> None:
        if self.batching and self._thread is None:
            self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Answers every request already queued, then ends the thread."""
        self._stopped = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def answer(self, served: Served, image: np.ndarray) -> Answer:
        """The answer for one uint8 image 3×S×S (InferenceError when the forward pass fails)."""
        if not self.batching:
            loop = asyncio.get_running_loop()
            return (await loop.run_in_executor(None, self._forward, served, [image]))[0]
        return await asyncio.wrap_future(self.submit(served, image))

    def submit(self, served: Served, image: np.ndarray) -> Future:
        """Queue one image for the batching thread; the future resolves to its `Answer`."""
        future: Future = Future()
        if self._stopped or self._thread is None:
            future.set_exception(InferenceError("the batcher is not running (the daemon is stopping)"))
            return future
        self._queue.put(_Request(served, image, future))
        return future

    def _forward(self, served: Served, images: list[np.ndarray]) -> list[Answer]:
        self._on_batch(len(images))
        try:
            answers = self._run(served, np.stack(images))
        except Exception as exc:
            raise InferenceError(f"inference failed on model {served.version}: {exc}") from exc
        if len(answers) != len(images):
            raise InferenceError(f"model {served.version} gave {len(answers)} answers for {len(images)} images")
        return answers

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """The first request and those that join it; True when the stop marker was met."""
        batch = [first]
        deadline = time.monotonic() + self.s.max_queue_delay_s
        while len(batch) < self.s.max_batch:
            wait = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._gather(first)
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
                except Exception as exc:  # every waiting request gets the error; the thread lives on
                    log.error("%s", exc)
                    for r in members:
                        r.future.set_exception(exc)
                    continue
                for r, a in zip(members, answers):
                    r.future.set_result(a)
        while True:  # requests that raced the stop marker still get an answer
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.set_exception(InferenceError("the batcher stopped (the daemon is stopping)"))
