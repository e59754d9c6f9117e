"""The generated parts of docs/: the configuration table from `daemon.ops.config.Settings` and the
CLI reference from the `edgetune` parser's own `--help`.

cog runs these from the `[[[cog` blocks in docs/configuration.md and docs/cli.md
(`bash scripts/docs.sh` rewrites them; tests/test_docs.py fails when they drift from the code).
The output must not depend on the terminal or the environment: the help is formatted at a fixed
width, without colour.
"""
from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, List

import annotated_types
from pydantic import SecretStr

WIDTH = 100  # columns the --help text is wrapped at


# ---- configuration ----------------------------------------------------------------------
def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names)
    if origin is typing.Literal:
        return " / ".join(json.dumps(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " / ".join(json.dumps(m.value) for m in annotation)
    if origin is dict:
        return f"table of {_type_name(args[1])}s"
    simple = {Path: "path", str: "string", int: "integer", float: "number", bool: "boolean", SecretStr: "string (secret)"}
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(metadata: List[Any]) -> str:
    """', 0 ≤ x ≤ 65535', ', x > 0' or '' from the field's annotated_types constraints."""
    low = high = None
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            low = ("≤", m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = ("<", m.gt)
        elif isinstance(m, annotated_types.Le):
            high = ("≤", m.le)
        elif isinstance(m, annotated_types.Lt):
            high = ("<", m.lt)
    if low and high:
        return f", {low[1]:g} {low[0]} x {high[0]} {high[1]:g}"
    if low:
        return f", x {'≥' if low[0] == '≤' else '>'} {low[1]:g}"
    if high:
        return f", x {high[0]} {high[1]:g}"
    return ""


def _toml(value: Any) -> str:
    """A default as it is written in config.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _toml(value.value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """One row per setting: key, default, type with its bounds, environment variable, description."""
    from daemon.ops.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| key | default | type | environment | description |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        shown = "unset" if default is None else f"`{_toml(default)}`"
        kind = _type_name(field.annotation) + _bounds(field.metadata)
        rows.append(f"| `{name}` | {shown} | {_cell(kind)} | `{prefix}{name.upper()}` | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


# ---- CLI ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _plain_terminal() -> Iterator[None]:
    """A fixed width and no colour, whatever terminal cog runs in."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "FORCE_COLOR", "PYTHON_COLORS")}
    os.environ.update(COLUMNS=str(WIDTH), NO_COLOR="1")
    for k in ("FORCE_COLOR", "PYTHON_COLORS"):
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _help(parser: Any, argv: List[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            parser.parse_args(argv + ["--help"])
        except SystemExit:
            pass
    text = out.getvalue()
    if not text.strip():
        raise RuntimeError(f"edgetune {' '.join(argv)} --help printed nothing")
    # Python < 3.10 heads the options "optional arguments:"; the reference is the same on every version.
    return text.replace("optional arguments:", "options:").rstrip() + "\n"


def commands(top_help: str) -> List[str]:
    """The subcommands the top-level help lists (four spaces in, under positional arguments)."""
    return re.findall(r"^    ([a-z][\w-]*)(?=\s|$)", top_help, re.M)


def cli_reference() -> str:
    """`edgetune --help`, then each command's `--help`, each under its own heading."""
    from daemon.cli import build_parser

    with _plain_terminal():
        top = _help(build_parser(), [])
        parts = ["### edgetune\n\n```\n" + top + "```\n"]
        for name in commands(top):
            parts.append(f"### edgetune {name}\n\n```\n" + _help(build_parser(), [name]) + "```\n")
    return "\n".join(parts)
