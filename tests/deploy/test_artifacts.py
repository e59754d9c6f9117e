"""The deployment files checked without a Jetson or a Docker engine: hadolint on Dockerfile.l4t,
shellcheck on the shell scripts, and the default config.toml and the configuration table of
docs/configuration.md against daemon.ops.config.Settings, so neither drifts from the code."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.ops.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} missing: it is in the dev extra (bash scripts/env.sh dev)"
    return path


def test_dockerfile_passes_hadolint():
    r = subprocess.run([_tool("hadolint"), "--no-color", "Dockerfile.l4t"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    r = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3" in r.stdout


def test_dockerfile_shape():
    text = (REPO / "Dockerfile.l4t").read_text()
    assert re.search(r"^ARG L4T_TAG=\S+\nFROM nvcr\.io/nvidia/l4t-pytorch:\$\{L4T_TAG\}$", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M) and 'VOLUME ["/var/lib/edgetune"]' in text
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/readyz", text, re.M)
    assert "--constraint /opt/edgetune/jetpack-torch.txt" in text  # pip may not replace JetPack's torch
    assert re.search(r'^ENTRYPOINT \["edgetune", "serve"\]$', text, re.M)


@pytest.mark.parametrize("script", ["deploy/install.sh", "bench/device_protocol.sh", "scripts/env.sh", "scripts/test.sh", "scripts/demo.sh", "scripts/docs.sh"])
def test_shell_scripts_pass_shellcheck(script):
    r = subprocess.run([_tool("shellcheck"), script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _config_lines() -> dict[str, str]:
    """key -> the commented `#key = value ...` line of deploy/config.toml."""
    lines = {}
    for line in (REPO / "deploy/config.toml").read_text().splitlines():
        m = re.match(r"#(\w+) = ", line)
        if m:
            assert m[1] not in lines, f"{m[1]} listed twice"
            lines[m[1]] = line[1:]
    return lines


def _default(name: str):
    field = Settings.model_fields[name]
    value = field.default_factory() if field.default_factory is not None else field.default
    return str(value) if isinstance(value, Path) else value


def test_default_config_lists_every_setting_with_its_default():
    lines = _config_lines()
    assert set(lines) == set(Settings.model_fields), set(lines) ^ set(Settings.model_fields)
    for name, line in lines.items():
        value = tomllib.loads(line)[name]
        if _default(name) is None:
            assert "default: unset" in line, line
        else:
            assert value == _default(name), (name, value, _default(name))


def test_default_config_uncommented_is_valid(tmp_path):
    text = "\n".join(lines for lines in _config_lines().values())
    (tmp_path / "config.toml").write_text(text.replace('"/var/lib/edgetune"', f'"{tmp_path}"'))
    s = load_settings(state_dir=tmp_path)
    assert s.api_token is not None and s.power_budget_w == 15.0 and s.idle_seconds == 30.0


def _readme_cell(name: str) -> str:
    line = _config_lines()[name]
    if _default(name) is None:
        return "unset"
    return "`" + line.split(" = ", 1)[1].split("   #")[0].strip() + "`"


def test_docs_configuration_table_has_every_setting_with_the_config_toml_default():
    doc = (REPO / "docs/configuration.md").read_text()
    section = doc.split("## All settings", 1)[1].split("\n## ", 1)[0]
    rows = {m[1]: m[2].strip() for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M)}
    missing = set(Settings.model_fields) - set(rows)
    assert not missing, f"docs/configuration.md table lacks {sorted(missing)}"
    for name in Settings.model_fields:
        assert rows[name] == _readme_cell(name), (name, rows[name], _readme_cell(name))


@pytest.mark.parametrize("needle", [
    "curl -X POST localhost:8000/prune", "--runtime nvidia", "sudo deploy/install.sh",
    "--uninstall", "/metrics", "scrape_configs", "/models/v0001/activate",
])
def test_user_docs_cover_deployment(needle):
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert any(needle in doc.read_text() for doc in docs)
