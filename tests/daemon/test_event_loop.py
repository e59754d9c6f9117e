"""`edgetune serve` runs on the event loop uvicorn picks (uvloop when installed), Python 3.8 to 3.13."""
from __future__ import annotations

import asyncio

import pytest
import uvicorn

from daemon import service


async def _app(scope, receive, send):  # pragma: no cover - never called
    raise AssertionError


def _loop_type():
    seen: list[type] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    return seen, main


def test_auto_runs_on_uvloop_when_installed():
    uvloop = pytest.importorskip("uvloop")
    seen, main = _loop_type()
    service.run(main(), service.loop_factory(uvicorn.Config(_app, loop="auto")))
    assert seen == [uvloop.Loop]


def test_asyncio_loop_when_asked():
    seen, main = _loop_type()
    service.run(main(), service.loop_factory(uvicorn.Config(_app, loop="asyncio")))
    assert seen and not seen[0].__module__.startswith("uvloop")
    assert issubclass(seen[0], asyncio.AbstractEventLoop)


def test_no_factory_is_asyncio_run():
    seen, main = _loop_type()
    service.run(main(), None)
    assert seen and not seen[0].__module__.startswith("uvloop")


def test_before_python_3_11_the_loop_is_run_and_closed_by_hand(monkeypatch):
    """Python 3.8 to 3.10 have no asyncio.Runner: the factory's loop runs the coroutine and is closed."""
    made: list[asyncio.AbstractEventLoop] = []

    def factory() -> asyncio.AbstractEventLoop:
        made.append(asyncio.new_event_loop())
        return made[-1]

    seen, main = _loop_type()
    monkeypatch.setattr(service.sys, "version_info", (3, 10, 0))
    service.run(main(), factory)
    assert seen == [type(made[0])] and made[0].is_closed()
