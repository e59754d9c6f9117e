"""Errors the user can fix, shared by every `edgetune` command."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad argument or input, reported as one line on stderr with exit status 2 (no traceback)."""
