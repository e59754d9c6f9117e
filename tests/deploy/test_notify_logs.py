"""sd_notify client and journald log format, on real sockets and real file descriptors."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from daemon.ops.logs import configure_logging, stream_is_journal, syslog_priority
from daemon.ops.notify import Notifier


def _receiver(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_to_an_abstract_socket():
    name = f"edgetune-test-{os.getpid()}-{time.monotonic_ns()}"
    rx = _receiver("\0" + name)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        n.ready("serving v0001;\ngate open")
        fields = rx.recv(4096).decode().split("\n")
        assert fields[0] == "READY=1" and fields[1] == "STATUS=serving v0001; gate open"  # a newline cannot split a field
        assert f"MAINPID={os.getpid()}" in fields
        n.stopping()
        assert rx.recv(4096) == b"STOPPING=1"
    finally:
        n.close()
        rx.close()


def test_without_socket_everything_is_a_no_op():
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.send("READY=1") is False
    asyncio.run(asyncio.wait_for(n.watchdog(), 1))  # returns at once


def test_watchdog_interval_from_environment():
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None  # another process's
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None
    assert Notifier({"NOTIFY_SOCKET": "/x"}).watchdog_interval_s is None


def test_a_blocked_event_loop_stops_the_watchdog_pings(tmp_path):
    """Pings flow while the loop runs; none is sent while it is blocked, however long that lasts. Counted,
    not timed: the loop yields until four pings have arrived (a busy machine only makes that slower)."""
    rx = _receiver(str(tmp_path / "n.sock"))
    rx.settimeout(0)
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "200000"})  # ping every 0.1 s

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(n.watchdog())
        healthy = 0
        for _ in range(3000):  # a bound on the polls, never reached unless the pings stop
            healthy += _drain(rx)
            if healthy >= 4:
                break
            await asyncio.sleep(0.01)
        time.sleep(0.6)  # the loop hangs for several ping intervals: no ping may be sent meanwhile
        hung = _drain(rx)
        task.cancel()
        return healthy, hung

    healthy, hung = asyncio.run(scenario())
    n.close()
    rx.close()
    assert healthy >= 4 and hung == 0, (healthy, hung)


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            assert sock.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            return count
        count += 1


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_journal_lines_have_priorities_and_no_timestamps(tmp_path, restore_logging):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(stream, env)
        configure_logging("info", stream, env)
        log = logging.getLogger("edgetune.test")
        log.debug("hidden")
        log.info("hello")
        log.warning("careful")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["<6>edgetune.test: hello", "<4>edgetune.test: careful", "<3>edgetune.test: failed"]
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[3:])  # the traceback keeps the priority
    assert lines[-1] == "<3>ValueError: boom"
    assert [syslog_priority(x) for x in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_plain_lines_when_stderr_is_not_the_journal(tmp_path, restore_logging):
    with open(tmp_path / "a", "w") as other, open(tmp_path / "b", "w") as stream:
        st = os.fstat(other.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}  # inherited, but stderr was redirected
        assert not stream_is_journal(stream, env) and not stream_is_journal(stream, {})
        configure_logging("info", stream, env)
        logging.getLogger("edgetune.test").info("hello")
    line = (tmp_path / "b").read_text().strip()
    assert line.endswith("INFO edgetune.test: hello") and line[:4].isdigit()
