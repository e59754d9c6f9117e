"""`edgetune serve`'s event loop: uvicorn plus what a service manager needs to hear.

uvicorn runs as a `uvicorn.Server` in our own loop so that READY=1 goes out only once the model is
loaded (Runtime is built before) and the socket listens (`server.started`), a one-line STATUS=
follows the scheduler, WATCHDOG=1 pings come from this loop (a blocked loop stops them), and
STOPPING=1 is sent as soon as shutdown begins.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any, Callable, Coroutine

import uvicorn

from .ops.notify import Notifier
from .runtime import Runtime

POLL_S = 0.2  # how soon a status change or the start of shutdown is announced


def status_line(rt: Runtime) -> str:
    """e.g. `serving v0003; gate closed: busy, not enough samples; cycle 2025…-ab12cd running (retrain epoch 1 batch 3/10)`."""
    served = rt.served()
    parts = [f"serving {served.version}" if served else "no model"]
    view = rt.scheduler.view()
    gate = view.gate
    # the reasons' heads ("busy", "too hot", …): their details change every poll
    parts.append("gate open" if gate.open else "gate closed: " + ", ".join(r.split(":")[0] for r in gate.reasons))
    current = view.current
    if current is not None and current.state.active:
        where = current.step or ""
        p = current.progress
        if {"epoch", "batch", "batches_per_epoch"} <= p.keys():
            where = f"{where} epoch {p['epoch']} batch {p['batch']}/{p['batches_per_epoch']}".strip()
        parts.append(f"cycle {current.id} {current.state.value}" + (f" ({where})" if where else ""))
    elif current is not None:
        parts.append(f"last cycle {current.id} {current.state.value}")
    return "; ".join(parts)


class _Server(uvicorn.Server):
    """Announces STOPPING=1 from the signal handler itself: uvicorn re-raises SIGTERM once it has
    shut down, which can end the process before a polling loop would notice `should_exit`."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier):
        super().__init__(config)
        self._notifier = notifier

    def handle_exit(self, sig, frame) -> None:
        self._notifier.stopping()
        super().handle_exit(sig, frame)


async def serve(config: uvicorn.Config, rt: Runtime, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    server = _Server(config, notifier)
    serving = asyncio.create_task(server.serve())
    watchdog = asyncio.create_task(notifier.watchdog())
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            last = status_line(rt)
            notifier.ready(last)
            while not serving.done() and not server.should_exit:
                line = status_line(rt)
                if line != last:
                    notifier.status(line)
                    last = line
                await asyncio.wait({serving}, timeout=POLL_S)
        notifier.stopping()
        await serving
    finally:
        watchdog.cancel()
        notifier.close()


def loop_factory(config: uvicorn.Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop uvicorn itself would run (`loop = "auto"`: uvloop when installed); None for
    asyncio's default. uvicorn before 0.36 installs an event loop policy instead."""
    get = getattr(config, "get_loop_factory", None)
    if get is not None:
        return get()
    config.setup_event_loop()
    return None


def run(main: Coroutine[Any, Any, None], factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    """asyncio.run on the loop `factory` makes (Python 3.8 has no loop_factory argument, 3.11 has
    asyncio.Runner)."""
    if factory is None:
        asyncio.run(main)
    elif sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:  # novermin (guarded: 3.11+)
            runner.run(main)
    else:
        loop = factory()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
