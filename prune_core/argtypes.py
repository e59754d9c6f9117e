"""argparse types for the `edgetune` commands, built on prune_core.options (the one validator of
cycle options): a bad value becomes argparse's one-line usage error, never a twin rule."""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, TypeVar

from .options import Level, parse_allocations, parse_criteria, parse_last_share, parse_level

T = TypeVar("T")


def checked_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the text and turns the parser's ValueError into a usage error."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def converted_by(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type that returns what `parse` makes of the text; its ValueError becomes a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {value}")
        return value

    return converted_by(parse)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got '{text}'") from None
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, got {text}")
    return value


non_negative_float: Callable[[str], float] = converted_by(_non_negative_float)
level: Callable[[str], Level] = converted_by(parse_level)  # 'auto' or a fraction strictly between 0 and 1
criteria = checked_by(parse_criteria)  # 'l1', or several comma-separated
allocations = checked_by(parse_allocations)  # 'uniform', 'global' or 'uniform,global'
last_share: Callable[[str], float] = converted_by(parse_last_share)
non_negative_int = _at_least(0)
positive_int = _at_least(1)


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as '{{\"width\": 32}}', got {type(value).__name__}")
    return value


json_object: Callable[[str], Dict[str, Any]] = converted_by(_json_object)  # keyword arguments, e.g. --arch-kwargs
