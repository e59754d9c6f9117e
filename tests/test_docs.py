"""The user documentation stays true to the code: the generated parts of docs/ (configuration
table, CLI reference) match what cog would generate now, the README stays a short entry point,
and every relative link in the docs leads somewhere."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.ops.config import Settings

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("docs/configuration.md", "docs/cli.md")
USER_DOCS = sorted([REPO / "README.md", REPO / "CHANGELOG.md", REPO / "bench/RESULTS.md", *(REPO / "docs").glob("*.md")])
README_LIMIT = 20_000  # bytes: the README is the entry point; details live in docs/


def _cog(*args: str, columns: str = "80") -> subprocess.CompletedProcess:
    assert importlib.util.find_spec("cogapp"), "cogapp is in the dev extra (bash scripts/env.sh dev)"
    env = {**os.environ, "COLUMNS": columns}  # the output may not depend on the terminal
    return subprocess.run(
        [sys.executable, "-m", "cogapp", *args, "-I", str(REPO), "-I", str(REPO / "docs")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )


def test_generated_docs_match_the_code():
    r = _cog("--check", "--diff", "--check-fail-msg", "run: bash scripts/docs.sh", *GENERATED, columns="37")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_drift_check_fails_on_stale_docs(tmp_path):
    stale = tmp_path / "configuration.md"
    text = (REPO / "docs/configuration.md").read_text()
    row = "| `port` | `8000` |"
    assert row in text
    stale.write_text(text.replace(row, "| `port` | `8080` |"))
    r = _cog("--check", str(stale))
    assert r.returncode != 0 and "configuration.md" in r.stdout + r.stderr


def test_every_setting_is_described():
    assert [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()] == []


def test_readme_is_an_entry_point():
    readme = (REPO / "README.md").read_bytes()
    assert len(readme) < README_LIMIT, f"README.md is {len(readme)} bytes; move details into docs/"
    assert b"bash scripts/test.sh" in readme and b"bash scripts/demo.sh" in readme


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m[1]) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def _links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        yield m[1]


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_somewhere(doc):
    assert doc.is_file()
    broken = []
    for target in _links(doc):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert broken == [], f"{doc.name}: broken links {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n[ok](x.md#title) [gone](nowhere.md) [anchor](x.md#nope)\n```\n[in code](ignored.md)\n```\n")
    assert list(_links(doc)) == ["x.md#title", "nowhere.md", "x.md#nope"]
    assert _anchors(doc) == {"title"}

