"""`edgetune serve` under a (simulated) systemd: a real notify socket, a real daemon process.

READY=1 must come only once the API answers /readyz, STATUS= lines must follow the scheduler,
WATCHDOG=1 pings must come at half $WATCHDOG_USEC, STOPPING=1 on SIGTERM; with $JOURNAL_STREAM
pointing at its stderr the daemon writes `<N>`-prefixed lines without timestamps.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow  # a real `edgetune serve`


class NotifyListener:
    """Receives sd_notify datagrams on a socket and timestamps them; on READY=1 it asks /readyz
    at once, so the test knows whether the API was already answering when READY was sent."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self.readyz_at_ready: int | None = None
        self.url: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = data.decode().split("\n")
            if "READY=1" in fields and self.readyz_at_ready is None:
                try:
                    self.readyz_at_ready = httpx.get(f"{self.url}/readyz", timeout=10).status_code
                except httpx.TransportError:
                    self.readyz_at_ready = -1
            self.messages.append((time.monotonic(), fields))

    def times(self, field: str) -> list[float]:
        return [t for t, fields in self.messages if field in fields]

    def values(self, prefix: str) -> list[str]:
        return [f[len(prefix):] for _, fields in self.messages for f in fields if f.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_notify_ready_status_watchdog_stopping_and_journal_lines(make_daemon, tmp_path, device_images):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    d = make_daemon(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    listener.url = d.url
    d.log.touch()
    st = os.stat(d.log)
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # the daemon's stderr *is* this file
    try:
        d.start()
        deadline = time.monotonic() + 30
        while not listener.times("READY=1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.times("READY=1"), listener.messages
        assert listener.readyz_at_ready == 200  # READY=1 only once the API answers
        ready_at = listener.times("READY=1")[0]
        assert not any("READY=1" in f for t, f in listener.messages if t < ready_at)
        assert listener.values("STATUS=")[0].startswith("serving v0001; gate closed: "), listener.values("STATUS=")

        deadline = time.monotonic() + 30  # watchdog every 0.5 s: wait for four pings, however slow the machine
        while len([t for t in listener.times("WATCHDOG=1") if t >= ready_at]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        pings = [t for t in listener.times("WATCHDOG=1") if t >= ready_at]
        assert len(pings) >= 4, pings
        # not a flood: three intervals take at least 3 × 0.25 s (a stalled machine only makes them longer)
        assert pings[3] - pings[0] >= 0.75, pings

        assert any("not enough samples" in s for s in listener.values("STATUS=")), listener.values("STATUS=")
        deadline = time.monotonic() + 10
        for image, label in device_images:  # traffic closes the gate: "busy"
            assert d.infer(image, label).status_code == 200
            if any("busy" in s for s in listener.values("STATUS=")) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert any("gate closed: busy" in s for s in listener.values("STATUS=")), listener.values("STATUS=")

        d.stop(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not listener.times("STOPPING=1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.times("STOPPING=1")
    finally:
        listener.close()
    log = d.log.read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), log[-2000:]
    assert any(line.startswith("<6>uvicorn.error: ") for line in lines)  # uvicorn's lines too
    assert not re.search(r"^<\d>\d{4}-\d\d-\d\d", log, re.M)  # no timestamps: journald adds its own

