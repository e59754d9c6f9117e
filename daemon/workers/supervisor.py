"""The cycle worker's process, seen from the daemon: start it, pause, resume or abort it through a
shared control value, kill it, and collect the typed events it sends.

The target is replaceable: the daemon runs `daemon.workers.worker.run_worker`, tests a fast fake with the
same signature `(job, control, events)`."""
from __future__ import annotations

import multiprocessing as mp
import queue
from typing import Callable, Optional

from .events import WorkerEvent
from .worker import Control, CycleJob, run_worker

WorkerTarget = Callable[[CycleJob, object, object], None]


class WorkerSupervisor:
    """Owns at most one worker process at a time."""

    def __init__(self, target: Optional[WorkerTarget] = None, context: str = "spawn"):
        self.target = target or run_worker
        self._ctx = mp.get_context(context)  # spawn: the daemon's threads and CUDA are not forked
        self._proc = None
        self._control = None
        self._events = None

    @property
    def started(self) -> bool:
        """A worker was started and not yet stopped."""
        return self._proc is not None

    def start(self, job: CycleJob) -> None:
        self.kill()
        self._control = self._ctx.Value("i", Control.RUN)
        self._events = self._ctx.Queue()
        self._proc = self._ctx.Process(target=self.target, args=(job, self._control, self._events),
                                       name=f"cycle-{job.cycle_id}", daemon=True)
        self._proc.start()

    def pause(self) -> None:
        self._tell(Control.PAUSE)

    def resume(self) -> None:
        self._tell(Control.RUN)

    def abort(self) -> None:
        self._tell(Control.ABORT)

    def _tell(self, value: Control) -> None:
        if self._control is not None:
            self._control.value = value

    def exitcode(self) -> int | None:
        """The worker's exit code once it has ended; None while it runs (or none was started)."""
        if self._proc is None or self._proc.is_alive():
            return None
        return self._proc.exitcode

    def drain(self, wait_s: float = 0.0) -> list[WorkerEvent]:
        """The events sent since the last drain, in order; waits up to `wait_s` for the first."""
        out: list[WorkerEvent] = []
        if self._events is None:
            return out
        try:
            if wait_s > 0:
                out.append(self._events.get(timeout=wait_s))
            while True:
                out.append(self._events.get_nowait())
        except (queue.Empty, OSError, ValueError, EOFError):
            return out

    def kill(self, grace_s: float = 0.0) -> None:
        """Give the worker `grace_s` to exit by itself, then kill it; forget it."""
        proc = self._proc
        if proc is not None:
            proc.join(timeout=grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._proc = None
