"""JetPack 5 (Xavier, Orin on L4T r35, the Dockerfile's default base) runs Python 3.8, while
development and CI run 3.11: nothing in the product may need a newer Python than
`requires-python`. vermin reads the code for modules, members and syntax that need more
(annotations are strings under `from __future__ import annotations`; pydantic and FastAPI
evaluate theirs through eval-type-backport before 3.10)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_requires_python_is_met_by_the_code():
    pyproject = (REPO / "pyproject.toml").read_text()
    minimum = re.search(r'requires-python = ">=(\d+\.\d+)"', pyproject)[1]
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent))
    assert vermin, "vermin is in the dev extra"
    r = subprocess.run(
        [vermin, f"--target={minimum}-", "--violations", "--no-tips", "--backport", "typing_extensions", "daemon", "prune_core", "bench"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_pydantic_gets_its_annotation_backport_before_python_3_10():
    assert "eval-type-backport>=0.2; python_version < '3.10'" in (REPO / "pyproject.toml").read_text()
