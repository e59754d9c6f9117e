"""ruff and mypy, configured in pyproject.toml, pass on the files listed here. The list is where the
tree stands: it grows file by file as each is made clean, until it is the whole of prune_core/,
daemon/ and tests/ (then the list goes and the test runs both on the packages). Each tool runs from
this interpreter's environment (the dev extra installs them) or from PATH; where neither has it,
the test skips naming the tool."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLEAN = [
    "daemon/cycles/cycle_cost.py", "daemon/cycles/cycle_records.py", "daemon/cycles/cycle_state.py", "daemon/serving/installer.py",
    "daemon/workers/child_process.py", "daemon/workers/events.py", "prune_core/checkpoint.py", "prune_core/cost.py", "prune_core/cost_records.py",
    "prune_core/onnx_export.py", "prune_core/options.py", "prune_core/state_dict.py",
]
CLEAN_TESTS = ["tests/test_cli_archs.py", "tests/test_lint.py", "tests/test_structure.py"]


def tool(name: str) -> list[str]:
    if importlib.util.find_spec(name) is not None:
        return [sys.executable, "-m", name]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return [found]


def check(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def test_ruff():
    check([*tool("ruff"), "check", "--no-cache", *CLEAN, *CLEAN_TESTS])


def test_mypy():
    # the project's packages are found through this interpreter, wherever mypy is installed
    check([*tool("mypy"), "--python-executable", sys.executable, "--cache-dir", "/dev/null", *CLEAN])


def test_the_listed_files_exist():
    assert [f for f in CLEAN + CLEAN_TESTS if not (REPO / f).is_file()] == []
