"""deploy/install.sh into a throwaway root: the files land where the unit expects them, the venv's
`edgetune` runs, a second run changes nothing, the user's config survives, and --uninstall removes
everything but the state directory unless --purge is given. The unit is then checked by systemd's
own tools (`systemd-analyze verify` and `security`)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = ["bash", "deploy/install.sh"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# pip installs the package into a fresh venv under a throwaway root, twice: the slow tier.
pytestmark = pytest.mark.slow
COPY = ("pyproject.toml", "README.md", "prune_core", "daemon", "deploy", "systemd")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the sources (pip builds in the source tree; keep the worktree clean)."""
    dest = tmp_path_factory.mktemp("src")
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "grafana"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _env() -> dict[str, str]:
    # Stands in for JetPack's system site-packages: the test venv's torch is importable by the
    # "system" python and, through it, by the --system-site-packages venv the installer makes.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "PIP_NO_INPUT": "1"}


def run_install(checkout: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(INSTALL + ["--python", sys.executable, *args], cwd=checkout, env=env or _env(),
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"install.sh {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def tree(root: Path) -> dict[str, tuple]:
    """Every file's content hash, mode and modification time (a rewrite with equal bytes shows too)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode, st.st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = ("dir", st.st_mode)
    return out


@pytest.fixture(scope="module")
def installed(checkout, tmp_path_factory, base_model_dir_for_install) -> Path:
    root = tmp_path_factory.mktemp("root")
    r = run_install(checkout, "--root", str(root), "--source", str(checkout), "--no-deps", "--model", str(base_model_dir_for_install))
    assert "systemctl status edgetune" in r.stdout and "not calling systemctl" in r.stdout
    return root


@pytest.fixture(scope="module")
def base_model_dir_for_install(tmp_path_factory) -> Path:
    """An untrained cifar_small model directory (the installer only copies it)."""
    from prune_core import ModelCard, build_model, save_model

    out = tmp_path_factory.mktemp("model") / "m"
    save_model(build_model("cifar_small", 3), ModelCard("cifar_small", 3, ["a", "b", "c"], 32), out)
    return out


def test_files_land_where_the_unit_expects_them(installed, checkout):
    root = installed
    unit = root / "etc/systemd/system/edgetune.service"
    assert unit.read_text() == (checkout / "systemd/edgetune.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) serve --state-dir (\S+) --model (\S+)$", unit.read_text(), re.M)
    binary, state_dir, model = exec_start.groups()
    assert (root / binary.lstrip("/")).is_file() and os.access(root / binary.lstrip("/"), os.X_OK)
    assert state_dir == "/var/lib/edgetune" and (root / model.lstrip("/") / "model.json").is_file()
    assert (root / "etc/edgetune/config.toml").read_text() == (checkout / "deploy/config.toml").read_text()
    assert (root / "opt/edgetune/config.toml.default").is_file()
    assert "include-system-site-packages = true" in (root / "opt/edgetune/venv/pyvenv.cfg").read_text()
    assert not (root / "var/lib/edgetune").exists()  # systemd's StateDirectory= creates it, as the service user
    # the installed command really runs from the venv, on the "system" torch
    r = subprocess.run([str(root / binary.lstrip("/")), "serve", "--help"], cwd=root, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--state-dir" in r.stdout, r.stderr
    r = subprocess.run([str(root / "opt/edgetune/venv/bin/python"), "-c", "import daemon, torch; print(daemon.__file__)"],
                       cwd=root, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(str(root / "opt/edgetune/venv/lib")), r.stdout + r.stderr


def test_second_run_changes_nothing_and_keeps_a_changed_config(installed, checkout):
    before = tree(installed)
    r = run_install(checkout, "--root", str(installed), "--source", str(checkout), "--no-deps")
    assert "up to date" in r.stdout and "wrote" not in r.stdout
    assert tree(installed) == before
    config = installed / "etc/edgetune/config.toml"
    config.write_text("idle_seconds = 5\n")
    r = run_install(checkout, "--root", str(installed), "--source", str(checkout), "--no-deps")
    assert config.read_text() == "idle_seconds = 5\n" and "kept your" in r.stdout


def test_unit_passes_systemd_analyze_verify_and_security(installed):
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    # the unit as installed, with ExecStart's path resolved inside the throwaway root
    text = (installed / "etc/systemd/system/edgetune.service").read_text()
    unit = installed.parent / "verify" / "edgetune.service"
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(text.replace("ExecStart=/opt/edgetune", f"ExecStart={installed}/opt/edgetune"))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "edgetune.service" not in r.stderr, r.stderr
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit)],
                       capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for edgetune.service: (\d+\.\d)", r.stdout)
    assert r.returncode == 0 and score and float(score[1]) <= 2.0, r.stdout[-2000:] + r.stderr
    deployment = " ".join((REPO / "docs/deployment.md").read_text().split())  # whatever the line wrapping
    assert f"exposure level **{score[1]}**" in deployment  # the score the docs quote is the current one


def test_a_broken_unit_fails_verify(tmp_path):
    """The verify test above can fail: an unknown directive and a missing binary are reported."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "edgetune.service"
    unit.write_text((REPO / "systemd/edgetune.service").read_text())  # /opt/edgetune/venv does not exist here
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "/opt/edgetune/venv/bin/edgetune" in r.stderr


def test_uninstall_keeps_state_unless_purged(installed, checkout, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    (root / "var/lib/edgetune/models").mkdir(parents=True)
    (root / "etc/edgetune/config.toml").write_text("idle_seconds = 5\n")
    r = run_install(checkout, "--root", str(root), "--uninstall")
    assert not (root / "etc/systemd/system/edgetune.service").exists() and not (root / "opt/edgetune").exists()
    assert (root / "var/lib/edgetune/models").is_dir() and (root / "etc/edgetune/config.toml").is_file()
    assert "kept" in r.stdout and "--purge" in r.stdout
    run_install(checkout, "--root", str(root), "--uninstall", "--purge")
    assert not (root / "var/lib/edgetune").exists() and not (root / "etc/edgetune").exists()


def test_refuses_without_jetpack_torch(checkout, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter without the test venv's torch
    r = subprocess.run(INSTALL + ["--python", str(base), "--root", str(tmp_path), "--no-deps"], cwd=checkout, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "torch and torchvision are not importable" in r.stderr and "--allow-pip-torch" in r.stderr
    assert not (tmp_path / "opt").exists()  # nothing half-installed
