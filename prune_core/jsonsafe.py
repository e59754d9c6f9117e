"""Strict-JSON values: NaN and infinities become None (JSON has no spelling for them, an empty
held-out split scores NaN, and parsers other than Python's reject Python's `NaN`)."""
from __future__ import annotations

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """Whether `value` is an int or a finite float (not None, NaN or infinite: a measurement that exists)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def finite(value: Any) -> Any:
    """`value` with every non-finite float (in nested dicts, lists and tuples) replaced by None;
    dict keys become strings, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
