"""Log lines: timestamped on a terminal; under systemd, journald's own convention.

When stderr is connected to the journal (systemd sets $JOURNAL_STREAM to its `device:inode`),
lines carry no timestamp (journald adds one) and start with the `<N>` syslog priority of
sd-daemon(3), so `journalctl -u edgetune -p warning` filters by level. Every line of a multi-line
record (a traceback) gets the prefix, because journald splits the stream on newlines.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (debug 7, info 6, warning 4, error 3, critical 2)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal connection systemd announced in $JOURNAL_STREAM (checked
    against the stream's device and inode, as systemd.exec(5) asks, so a redirected stderr of a
    child process does not get the prefixes)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(level: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Root logging for the daemon (uvicorn's loggers propagate to it)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if stream_is_journal(stream, environ) else logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
