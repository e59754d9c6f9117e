"""Comma-separated option lists ('taylor,apoz', 'uniform,global'): a cycle tries each named option and
keeps the model best on the held-out split."""
from __future__ import annotations

from typing import Iterable


def parse_choices(text: str, known: Iterable[str], what: str, plural: str = "several") -> tuple[str, ...]:
    """The names in `text`, in order; a ValueError naming the bad one when it is unknown or repeated."""
    known = tuple(known)
    names = tuple(n.strip() for n in text.split(","))
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} '{name}'; choose from {', '.join(known)} (or {plural}, comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} '{text}' names one twice")
    return names
