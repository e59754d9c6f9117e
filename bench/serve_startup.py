"""Start-up time and idle memory of the serving process (issue 21: a light serving process).

Starts `edgetune serve` from a checkout (`--tree`, default this one) on a prepared state directory (a model already imported,
its engines already built), times process start to the first `/readyz` 200, waits `--idle` seconds,
and reads the process's resident memory and whether libtorch is mapped into it. Runs are sequential;
the median is printed with every run.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/serve_startup.py --state-dir /tmp/state --backend onnxruntime
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(tree: Path, state_dir: str, backend: str | None, idle: float, timeout: float = 300) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("EDGETUNE_DEVICE", "cpu")
    if backend:
        env["EDGETUNE_SERVING_BACKEND"] = backend
    cmd = [sys.executable, "-c", "import sys; from daemon.cli import main; main(sys.argv[1:])", "serve",
           "--state-dir", state_dir, "--port", str(port), "--log-level", "warning"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ready = None
    try:
        while ready is None and time.perf_counter() - start < timeout and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    ready = time.perf_counter() - start if r.status == 200 else None
            except OSError:
                time.sleep(0.02)
        if ready is None:
            raise SystemExit(f"serve_startup: not ready ({proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'})")
        time.sleep(idle)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS"))
        torch_mapped = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            model = json.load(r)["model"]
        served = (model.get("serving") or {}).get("backend", "torch")
        return {"ready_s": ready, "rss_mib": rss, "libtorch": torch_mapped, "served_by": served}
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", required=True, help="a daemon state directory with a model (and its engines) in it")
    p.add_argument("--backend", default=None, help="serving_backend (EDGETUNE_SERVING_BACKEND); default: the setting's")
    p.add_argument("--tree", default=str(REPO), help="the edgetune checkout to start (default: this one)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--idle", type=float, default=8.0, help="seconds idle before the memory is read")
    args = p.parse_args(argv)
    runs = [start_once(Path(args.tree), args.state_dir, args.backend, args.idle) for _ in range(args.runs)]
    print("| run | served by | start to /readyz (s) | idle RSS (MiB) | libtorch mapped |\n|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['served_by']} | {r['ready_s']:.2f} | {r['rss_mib']:.0f} | {r['libtorch']} |")
    print(f"| median | | {statistics.median(r['ready_s'] for r in runs):.2f} | {statistics.median(r['rss_mib'] for r in runs):.0f} | |")


if __name__ == "__main__":
    main()
