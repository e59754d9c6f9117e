"""`edgetune status` and `edgetune watch` against a real daemon, as a person on SSH would run them."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

EDGETUNE = shutil.which("edgetune", path=os.path.dirname(sys.executable))
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([EDGETUNE, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_status_prints_the_tables(shared_daemon, device_images):
    for data, label in device_images[:6]:
        assert shared_daemon.infer(data, label).status_code == 200
    out = _run("status", "--url", shared_daemon.url)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("Model", "v0001", "cifar_small", "backend", "Buffer", "Gate", "Telemetry (simulated)", "Cycle"):
        assert expected in text, text
    assert "45.0°C  (limit 75°C)" in text  # the simulated temperature against the thermal limit
    assert "6 / 20000" in text
    assert "not enough samples" in text  # why the gate is closed (min_samples 30)


def test_status_says_when_the_daemon_is_unreachable():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = _run("status", "--url", url)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "cannot reach the daemon at " + url in out.stderr


def test_watch_follows_a_cycle_to_its_end(make_daemon, device_images):
    d = make_daemon({"EDGETUNE_CYCLE_MIN_STEPS": "10", "EDGETUNE_MAX_ACCURACY_DROP": "1"}).start()
    for data, label in device_images[:60]:
        assert d.infer(data, label).status_code == 200
    watch = subprocess.Popen([EDGETUNE, "watch", "--url", d.url, "--interval", "0.2", "--timeout", "300"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(2)  # watch is waiting for the next cycle
    assert watch.poll() is None
    cycle_id = d.client.post("/prune", json={"level": 0.5, "epochs": 1}).json()["cycle_id"]
    out, err = watch.communicate(timeout=300)
    assert watch.returncode == 0, err
    assert f"following cycle {cycle_id}" in out
    assert "running" in out and f"cycle {cycle_id} accepted" in out
    assert "now serving v0002 (was v0001)" in out
    assert f"/cycles/{cycle_id}/report.png" in out
    assert d.client.get(f"/cycles/{cycle_id}").json()["state"] == "accepted"


# `edgetune ARGS`, then which heavy packages the process imported (a status check over SSH should not load torch)
IMPORTS_AFTER = """
import sys
sys.argv = ["edgetune", *sys.argv[1:]]
from daemon.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print("exit", code, "imported", *[m for m in ("torch", "torchvision", "prune_core.cli") if m in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["watch", "--help"], ["status", "--url", "http://127.0.0.1:1"]])
def test_light_commands_do_not_import_torch(args):
    out = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, *args], capture_output=True, text=True, timeout=120, env=ENV)
    last = out.stderr.splitlines()[-1].split()
    assert last[:2] == ["exit", "2" if args[0] == "status" and "--url" in args else "0"], out.stderr
    assert last[3:] == ["prune_core.cli"], out.stderr  # the parser was built, and neither torch nor torchvision came with it


def test_a_heavy_command_does_import_torch():
    """The check above can fail: `prune --help` lists the registered criteria, which needs torch."""
    out = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, "prune", "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert "--criterion" in out.stdout
    assert "torch" in out.stderr.splitlines()[-1].split()[3:], out.stderr
