"""`edgetune demo` for real, with small flags: a base model trained in the state dir, a real
`edgetune serve` child, the camera stream through /infer, the daemon's own idle-gated cycle and
swap, the before/after table, a clean exit with --once; then a second run on the same state dir
that reuses the base model and is interrupted with Ctrl-C mid-stream, a third ended by SIGTERM and a
fourth by SIGKILL. No daemon may survive any of them."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SMALL = [
    "--once", "--base-epochs", "1", "--images-per-class", "40", "--label-every", "1",
    "--level", "0.3", "--cycle-epochs", "2", "--cycle-min-steps", "15", "--idle-seconds", "1", "--timeout", "400",
    "--distil-budget", "0",  # epochs, not seconds: the test does not depend on this machine's speed
]
# The cycle worker is niced 10 by default: on a CI machine busy with other tests it would get a
# sliver of the CPU (minutes instead of seconds). Environment settings override the demo's config.toml.
ENV = {**os.environ, "EDGETUNE_WORKER_NICE": "0"}


def edgetune(*args: str) -> list[str]:
    return [shutil.which("edgetune", path=os.path.dirname(sys.executable)), "demo", *args]


def daemon_pids(state: Path) -> list[int]:
    return [int(p) for p in re.findall(r"Started server process \[(\d+)\]", (state / "serve.log").read_text())]


def assert_no_daemon_left(state: Path, runs: int) -> None:
    pids = daemon_pids(state)
    assert len(pids) == runs
    for pid in pids:
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"daemon {pid} still running"
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_demo_once_then_reuse_and_interrupt(tmp_path):
    state = tmp_path / "demo-state"
    run = subprocess.run(edgetune("--state-dir", str(state), *SMALL), capture_output=True, text=True, timeout=900, env=ENV)
    out = run.stdout
    assert run.returncode == 0, f"{out[-4000:]}\n{run.stderr[-3000:]}"
    assert "trained the base model" in out
    assert "a user labels 1 image in 1" in out

    # the probe line says how the retrained model was chosen: at least the 2 epochs asked for, one of them kept
    probe = re.search(r"^\[cycle\] level 0\.30: held-out top-1 [\d.]+ with [\d,]+ params \(retrained (\d+) epochs, kept epoch (\d+)", out, re.M)
    assert probe and int(probe[1]) >= 2 and 0 <= int(probe[2]) <= int(probe[1]), out[-3000:]

    # the before/after table: the same held-out images, a smaller model after
    rows = {m[0]: m[1:] for m in re.findall(r"^(before|after)\s+(v\d{4})\s+([\d,]+)\s+[\d.]+M\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.M)}
    assert rows["before"][0] == "v0001" and rows["after"][0] == "v0002", out[-3000:]
    assert int(rows["after"][1].replace(",", "")) < int(rows["before"][1].replace(",", ""))

    # the swap, as /status showed it: the daemon's own (periodic, idle-gated) cycle was accepted
    status = json.loads(re.search(r"^/status after the cycle:\n(\{.*?^\})$", out, re.M | re.S).group(1))
    assert status["cycle"]["trigger"] == "periodic" and status["cycle"]["state"] == "accepted"
    assert status["cycle"]["version_before"] == "v0001"
    assert status["model"]["version"] == status["cycle"]["version_after"] == "v0002"
    assert "daemon stopped cleanly" in out
    assert_no_daemon_left(state, 1)

    # a second run reuses the base model; Ctrl-C in the middle of the stream stops its daemon
    weights = state / "base" / "weights.safetensors"
    mtime = weights.stat().st_mtime_ns
    run2 = end_mid_stream(state, signal.SIGINT)
    out2 = run2.stdout
    assert run2.returncode == 130, out2[-3000:]
    assert "reusing the base model" in out2 and "trained the base model" not in out2
    assert "the previous run left v0002 active" in out2
    assert weights.stat().st_mtime_ns == mtime
    assert "daemon stopped cleanly" in out2 or "interrupted" in out2
    assert_no_daemon_left(state, 2)

    # SIGTERM (a process manager, `kill`) and SIGKILL end the demo without its daemon surviving:
    # SIGTERM by the demo's own clean-up, SIGKILL by the kernel (the daemon dies with its parent)
    for sig, code, runs in ((signal.SIGTERM, 128 + signal.SIGTERM, 3), (signal.SIGKILL, -signal.SIGKILL, 4)):
        out3 = end_mid_stream(state, sig)
        assert out3.returncode == code, out3.stdout[-3000:]
        if sig == signal.SIGTERM:
            assert "interrupted by SIGTERM" in out3.stdout and "daemon stopped cleanly" in out3.stdout, out3.stdout[-3000:]
            assert "edgetune demo: ended by SIGTERM" in out3.stdout
        wait_until_no_daemon_left(state, runs)


def end_mid_stream(state: Path, sig: int) -> subprocess.CompletedProcess:
    """A demo run on `state` sent `sig` once its camera stream has begun."""
    proc = subprocess.Popen(edgetune("--state-dir", str(state), *SMALL), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[camera]"):
                proc.send_signal(sig)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + rest)


def wait_until_no_daemon_left(state: Path, runs: int, timeout_s: float = 60) -> None:
    """`assert_no_daemon_left`, allowing a daemon told to stop by the kernel its clean shutdown."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return assert_no_daemon_left(state, runs)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_ending_signals_raise_in_the_demo(sig):
    """In-process: the handler turns the signal into `Ended` (the demo's way out, which stops its
    daemon), ignores a second one during the clean-up, and restores the previous handlers."""
    from daemon.clients.demo import Ended, signals_end_demo

    before = signal.getsignal(sig)
    with pytest.raises(Ended) as ended:
        with signals_end_demo():
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler runs at the next bytecode boundary: never reached
            except Ended:
                assert signal.getsignal(sig) is signal.SIG_IGN
                os.kill(os.getpid(), sig)  # a second one, during the clean-up: ignored
                raise
    assert ended.value.signum == sig and str(ended.value) == signal.Signals(sig).name
    assert signal.getsignal(sig) is before


def test_demo_rejects_bad_classes(tmp_path):
    run = subprocess.run(edgetune("--state-dir", str(tmp_path / "s"), "--classes", "1,x"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--classes takes distinct digits 0-9" in run.stderr
    assert not (tmp_path / "s").exists()
