"""sd_notify(3) without libsystemd: READY/STATUS/STOPPING/WATCHDOG datagrams to $NOTIFY_SOCKET.

Under `Type=notify` systemd waits for READY=1 before it calls the service started, shows the last
STATUS= line in `systemctl status`, and with `WatchdogSec=` restarts the service when WATCHDOG=1
pings stop. Outside systemd (no $NOTIFY_SOCKET) every call is a silent no-op.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("edgetune.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or None
        if path is not None and path.startswith("@"):  # abstract namespace
            path = "\0" + path[1:]
        self.address = path
        self.watchdog_interval_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._stopping = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; False (logged once per failure) if it could not."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        """Once: both the signal handler and the end of serving announce it."""
        if not self._stopping:
            self._stopping = self.send("STOPPING=1")

    async def watchdog(self) -> None:
        """Ping every half watchdog period, from the event loop itself: when the loop is blocked the
        pings stop and systemd restarts the service. Returns at once when no watchdog is set."""
        if self.watchdog_interval_s is None or self.address is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env) -> float | None:
    """Half of $WATCHDOG_USEC, if it is set and meant for this process ($WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
