"""Benchmark a real `edgetune serve`.

--mode speed (default; issue 21's benchmark): per serving backend (`--backends torch,onnxruntime`,
given to the daemon as its `serving_backend` setting) and for an unpruned and a pruned resnet18 at
32 px, in one run: the forward pass in process at batch 1 and its batch-16 throughput (the
backend's own engine, daemon.engines), decoding one request's image, a bare FastAPI route's round
trip on the same machine and its throughput with 16 concurrent clients (the HTTP floor, the bound
any server has here), `/infer` p50/p99 for one sequential client, throughput
with 1, 4 and 16 concurrent clients, failed requests across 20 swaps under load, the daemon's idle
RSS and its start-up time (process start to /readyz 200); a table puts the issue's targets beside
the numbers. The daemon serves with one onnxruntime intra-op thread (`serving_threads = 1`), as the
in-process forward is measured; run it with OMP_NUM_THREADS=1 so torch's matches. The concurrent
clients use a minimal keep-alive HTTP client (`--client raw`) unless `--client httpx`.

    python bench/serve_bench.py [--backends torch,onnxruntime] [--requests 300] [--seconds 5]

--mode cycle: ingest rate, /infer latency idle vs during a cycle, failed requests across repeated
hot-swaps, swap latency, cycle time and peak RSS; and a sustained load test (--sustain S): several
clients hold /infer for S seconds while cycles and swaps keep happening.

    python bench/serve_bench.py --mode cycle [--swaps 20]
    python bench/serve_bench.py --mode cycle --only-sustain --sustain 240 --clients 4

Prints a table and writes serve_bench.csv (cycle) or serve_speed.csv (speed) to --out.
Everything runs on loopback against temporary state directories; cycle mode's model is the demo's
small CNN trained for one epoch on MNIST-5k.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

from prune_core import ModelCard, TrainConfig, build_model, save_model, split_holdout, train
from prune_core.datasets import MNIST_CLASSES, mnist5k


def png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Load:
    """A client thread sending /infer in a loop, recording latency and failures."""

    def __init__(self, url: str, images: list[bytes]):
        self.url, self.images = url, images
        self.latencies: list[float] = []
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    r = client.post("/infer", content=self.images[i % len(self.images)], headers={"content-type": "image/png"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append((time.perf_counter() - start) * 1000)
                self.failed += not ok
                i += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def sustained(url: str, client: httpx.Client, probe: list[bytes], seconds: float, clients: int) -> list[tuple[str, float, str]]:
    """`clients` threads hold /infer for `seconds` while forced cycles (each from the oldest,
    largest version) and activations between the stored versions keep running."""
    final = ("accepted", "rejected", "failed", "aborted")
    outcomes: dict[str, int] = {}
    swaps = 0
    loads = [Load(url, probe) for _ in range(clients)]
    for load in loads:
        load.__enter__()
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            versions = [m["version"] for m in client.get("/models").json()]
            if client.get("/status").json()["model"]["version"] != versions[-1]:
                client.post(f"/models/{versions[-1]}/activate").raise_for_status()
                swaps += 1
            cycle_id = client.post("/prune", json={"force": True, "epochs": 1}).json()["cycle_id"]
            while (record := client.get(f"/cycles/{cycle_id}").json())["state"] not in final:
                time.sleep(0.5)
            outcomes[record["state"]] = outcomes.get(record["state"], 0) + 1
            swaps += record["state"] == "accepted"
            versions = [m["version"] for m in client.get("/models").json()]
            for k in range(10 if len(versions) >= 2 else 0):  # swaps under load between cycles
                if time.perf_counter() - started >= seconds:
                    break
                client.post(f"/models/{versions[k % 2]}/activate").raise_for_status()
                swaps += 1
                time.sleep(1.0)
    finally:
        elapsed = time.perf_counter() - started
        for load in loads:
            load.__exit__()
    latencies = [x for load in loads for x in load.latencies]
    failed = sum(load.failed for load in loads)
    cycles = ", ".join(f"{n} {state}" for state, n in sorted(outcomes.items()))
    return [
        (f"sustained: {clients} clients for {elapsed:.0f} s, requests/s", len(latencies) / elapsed, f"{len(latencies)} requests"),
        ("sustained: /infer p50 (ms)", percentile(latencies, 0.5), ""),
        ("sustained: /infer p99 (ms)", percentile(latencies, 0.99), ""),
        ("sustained: failed requests", failed, "non-200 or transport error"),
        ("sustained: cycles finished", sum(outcomes.values()), cycles),
        ("sustained: hot-swaps", swaps, "accepted cycles + activations"),
    ]


def cycle_main(args) -> None:
    """--mode cycle: ingest, latency idle and during a cycle, swaps, the sustained load test."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    rows: list[tuple[str, float, str]] = []

    data = mnist5k(32)
    tr, ho = split_holdout(data, 0.2)
    torch.manual_seed(0)
    model = build_model("cifar_small", 10)
    card = ModelCard("cifar_small", 10, MNIST_CLASSES, 32)
    train(model, tr, ho, card.mean, card.std, TrainConfig(epochs=1, lr=0.05, flip=False))
    save_model(model, card, work / "base")
    device_idx = torch.nonzero(torch.isin(data.labels, torch.tensor([1, 4, 7]))).flatten()
    device_idx = device_idx[torch.randperm(len(device_idx), generator=torch.Generator().manual_seed(0))][: args.samples]
    images = [(png(data.images[i]), str(int(data.labels[i]))) for i in device_idx.tolist()]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    telemetry = work / "telemetry.json"
    telemetry.write_text(json.dumps({"temperature_c": 45}))
    env = {**os.environ, "EDGETUNE_TELEMETRY": "simulated", "EDGETUNE_SIMULATED_TELEMETRY": str(telemetry),
           "EDGETUNE_AUTO_CYCLES": "false", "EDGETUNE_MIN_SAMPLES": "50", "EDGETUNE_CYCLE_LEVEL": "0.5",
           "EDGETUNE_CYCLE_CRITERION": "l1", "EDGETUNE_CYCLE_FINETUNE_BEFORE": "0", "EDGETUNE_MAX_ACCURACY_DROP": "0.1"}
    exe = shutil.which("edgetune", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen([exe, "serve", "--state-dir", str(work / "state"), "--model", str(work / "base"), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60)
    try:
        for _ in range(300):
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        if args.only_sustain:
            for k in range(0, len(images), 50):
                batch = images[k : k + 50]
                client.post("/samples", json={"samples": [{"image": base64.b64encode(b).decode(), "label": l} for b, l in batch]}).raise_for_status()
            rows += sustained(url, client, [b for b, _ in images[:100]], args.sustain, args.clients)
        else:
            rows += measure(args, url, client, images, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10.2f}  {note}")
    with open(out / "serve_bench.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("measure", "value", "note"), *rows])
    print(f"\nwritten {out / 'serve_bench.csv'}")


def measure(args, url: str, client: httpx.Client, images: list[tuple[bytes, str]], proc) -> list[tuple[str, float, str]]:
    """Ingest rates, idle and busy latency, a cycle under load, swaps under load."""
    rows: list[tuple[str, float, str]] = []
    # ingest: bulk (no inference) and through /infer
    half = len(images) // 2
    start = time.perf_counter()
    for k in range(0, half, 50):
        batch = images[k : min(k + 50, half)]
        r = client.post("/samples", json={"samples": [{"image": base64.b64encode(b).decode(), "label": l} for b, l in batch]})
        r.raise_for_status()
    rows.append(("ingest rate, POST /samples (samples/s)", half / (time.perf_counter() - start), ""))
    start = time.perf_counter()
    for b, l in images[half:]:
        client.post("/infer", params={"label": l}, content=b, headers={"content-type": "image/png"}).raise_for_status()
    rows.append(("ingest rate, POST /infer sequential (samples/s)", (len(images) - half) / (time.perf_counter() - start), ""))

    probe = [b for b, _ in images[:100]]
    with Load(url, probe) as idle:
        time.sleep(args.seconds)
    rows += [("/infer p50 idle (ms)", percentile(idle.latencies, 0.5), f"{len(idle.latencies)} requests"),
             ("/infer p99 idle (ms)", percentile(idle.latencies, 0.99), f"{idle.failed} failed")]

    daemon_ps = psutil.Process(proc.pid)
    peak = [0.0]

    def rss() -> float:
        total = 0
        for p in [daemon_ps] + daemon_ps.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    cycle_id = client.post("/prune", json={"force": True, "epochs": 3}).json()["cycle_id"]
    started = time.perf_counter()
    with Load(url, probe) as busy:
        while True:
            peak[0] = max(peak[0], rss())
            record = client.get(f"/cycles/{cycle_id}").json()
            if record["state"] in ("accepted", "rejected", "failed", "aborted"):
                break
            time.sleep(0.2)
    cycle_s = time.perf_counter() - started
    rows += [("/infer p50 during a cycle (ms)", percentile(busy.latencies, 0.5), f"{len(busy.latencies)} requests"),
             ("/infer p99 during a cycle (ms)", percentile(busy.latencies, 0.99), f"{busy.failed} failed"),
             ("cycle time (s)", cycle_s, record["state"] + (f": {record['reason']}" if record["reason"] else "")),
             ("peak RSS, daemon + worker (MiB)", peak[0], "")]

    versions = [m["version"] for m in client.get("/models").json()]
    if len(versions) >= 2:
        swap_ms = []
        with Load(url, probe) as swapping:
            for k in range(args.swaps):
                t0 = time.perf_counter()
                client.post(f"/models/{versions[k % 2]}/activate").raise_for_status()
                swap_ms.append((time.perf_counter() - t0) * 1000)
        rows += [(f"requests failed across {args.swaps} swaps", swapping.failed, f"of {len(swapping.latencies)}"),
                 ("swap latency p50 (ms)", statistics.median(swap_ms), "load + warm-up + swap"),
                 ("swap latency max (ms)", max(swap_ms), "")]
    else:
        rows.append(("swaps", float("nan"), "skipped: the cycle produced no second version"))
    if args.sustain > 0:
        rows += sustained(url, client, probe, args.sustain, args.clients)
    return rows


# ---- --mode speed: issue 21's benchmark --------------------------------------------------------------
CLIENTS = (1, 4, 16)
SWAP_CLIENTS = 4
HTTP_FLOOR_APP = textwrap.dedent("""
    import sys
    import uvicorn
    from fastapi import FastAPI, Request
    app = FastAPI()
    @app.post("/infer")
    async def bare(request: Request):
        return {"bytes": len(await request.body())}
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
""")


@dataclass
class Row:
    backend: str
    model: str
    measure: str
    value: float
    target: str = ""
    met: bool | None = None  # None: no target here
    note: str = ""


@dataclass
class Forward:
    """A backend's engine in process, for one model: wall time, and the calling thread's CPU time
    (one intra-op thread, so CPU time is what the call costs whatever else the machine runs)."""

    batch1_ms: float
    batch16_per_s: float
    decode_ms: float
    batch1_cpu_ms: float
    batch16_cpu_ms_per_image: float
    decode_cpu_ms: float


@dataclass
class Floor:
    """The bare FastAPI route under uvicorn (the HTTP floor): what any /infer costs before it does
    any work, for one sequential client and for the concurrent clients of the throughput rows."""

    p50_ms: float
    cpu_ms: float  # its server's CPU per request, one sequential client
    rate16: float  # requests/s with 16 concurrent clients, the same client as /infer's
    cpu16_ms: float  # its server's CPU per request at 16 clients


@dataclass
class DaemonRun:
    """What one daemon run measured for one backend."""

    reported: str  # the backend the daemon says it serves (/status)
    startup_s: float
    idle_rss_mib: float
    rows: list[Row] = field(default_factory=list)


def jpeg(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_ms(fn, runs: int, warm: int = 3) -> tuple[float, float]:
    """Median wall and thread-CPU milliseconds of `fn()`."""
    for _ in range(warm):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return statistics.median(wall) * 1000, statistics.median(cpu) * 1000


def prepare_models(work: Path, level: float) -> dict[str, Path]:
    """resnet18 at 32 px with its initial weights, and a copy pruned by L1 at `level` (speed does
    not need training), as model directories."""
    import copy

    from prune_core import PruneSpec, get_criterion, prune_to_level

    torch.manual_seed(0)
    base = build_model("resnet18", 10).eval()
    pruned = prune_to_level(copy.deepcopy(base), get_criterion("l1").score(base), PruneSpec(level), 32).model.eval()
    card = ModelCard("resnet18", 10, MNIST_CLASSES, 32)
    dirs = {}
    for name, model in (("unpruned", base), (f"pruned {level:g}", pruned)):
        save_model(model, card, work / name.replace(" ", "-"))
        dirs[name] = work / name.replace(" ", "-")
    return dirs


def prepare_state(state_dir: Path, dirs: dict[str, Path]) -> dict[str, str]:
    """A state directory holding both models as versions (the unpruned one active): model name -> version."""
    from daemon.storage.model_store import ModelStore

    store = ModelStore(state_dir / "models")
    versions = {name: store.import_model(d) for name, d in dirs.items()}
    store.set_active(versions[next(iter(dirs))])
    return versions


def forward(backend: str, version_dir: Path, payloads: list[bytes], verify: np.ndarray) -> Forward:
    """The backend's own engine (daemon.engines; onnxruntime's is built and verified into the version
    directory first, where the daemon will find it): batch-1 latency, batch-16 throughput, and the
    time to decode one request's image."""
    from daemon.engines import Backend, InputSpec, load_engine
    from daemon.engines.build import build_engine
    from daemon.engines.eager import TorchEngine
    from prune_core.data import decode_image
    from prune_core.model_format import load_model

    model, card = load_model(version_dir)
    if backend == "torch":
        engine = TorchEngine(model, InputSpec.of(card), torch.device("cpu"))
    else:
        build_engine(model, card, version_dir, Backend(backend), verify, threads=1)
        engine = load_engine(version_dir, Backend(backend), threads=1)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 3, card.input_size, card.input_size), dtype=np.uint8)
    sixteen = rng.integers(0, 256, (16, 3, card.input_size, card.input_size), dtype=np.uint8)
    batch1 = median_ms(lambda: engine.logits(one), 200)
    batch16 = median_ms(lambda: engine.logits(sixteen), 30)
    cycle = iter(payloads * 10)
    decode = median_ms(lambda: decode_image(next(cycle), card.preprocess), 200)
    return Forward(batch1[0], 16 / (batch16[0] / 1000), decode[0], batch1[1], batch16[1] / 16, decode[1])


def http_floor(payloads: list[bytes], requests: int, seconds: float) -> Floor:
    """A bare FastAPI route under uvicorn that reads the body, the floor under any /infer: its p50
    round trip and its server's CPU per request for one sequential client, and its throughput with
    16 concurrent clients (the bound any server has on this machine)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HTTP_FLOOR_APP, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(300):
                try:
                    client.post("/infer", content=payloads[0], headers={"content-type": "image/jpeg"}).raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            cpu0 = cpu_seconds(proc)
            p50 = percentile(sequential(client, "/infer", payloads[:1], requests), 0.5)
            cpu = (cpu_seconds(proc) - cpu0) / (requests + 20) * 1000
        cpu0 = cpu_seconds(proc)
        rate, failed, _ = throughput(f"http://127.0.0.1:{port}", payloads, 16, seconds)
        if failed:
            raise RuntimeError(f"the bare route failed {failed} requests")
        return Floor(p50, cpu, rate, (cpu_seconds(proc) - cpu0) / max(rate * seconds, 1) * 1000)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def sequential(client: httpx.Client, path: str, payloads: list[bytes], requests: int, warm: int = 20) -> list[float]:
    """Round trips (ms) of one client sending one request after the other."""
    out = []
    for i in range(warm + requests):
        start = time.perf_counter()
        client.post(path, content=payloads[i % len(payloads)], headers={"content-type": "image/jpeg"}).raise_for_status()
        if i >= warm:
            out.append((time.perf_counter() - start) * 1000)
    return out


async def _closed_loop_httpx(url: str, payloads: list[bytes], clients: int, stop) -> tuple[int, int, float]:
    """`clients` httpx connections each sending /infer back to back until stop(): (answered, failed, seconds)."""
    done = [0, 0]

    async def one(k: int, client: httpx.AsyncClient) -> None:
        i = k
        while not stop():
            try:
                r = await client.post("/infer", content=payloads[i % len(payloads)], headers={"content-type": "image/jpeg"})
                done[r.status_code != 200] += 1
            except httpx.HTTPError:
                done[1] += 1
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(k, client) for k in range(clients)))
        return done[0], done[1], time.perf_counter() - start


async def _closed_loop_raw(url: str, payloads: list[bytes], clients: int, stop) -> tuple[int, int, float]:
    """The same load from a minimal HTTP/1.1 keep-alive client on asyncio streams (as wrk would): on a
    2-core machine httpx's own CPU per request, spent on the cores the daemon needs, caps what the
    daemon can show. Answered = status 200 with a complete body; anything else, or a dropped
    connection (then reopened), is a failure."""
    host, port = url.split("//", 1)[1].split(":")
    done = [0, 0]
    requests = [(f"POST /infer HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Length: {len(p)}\r\n\r\n").encode() + p for p in payloads]

    async def one(k: int) -> None:
        i, conn = k, None
        while not stop():
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                reader, writer = conn
                writer.write(requests[i % len(requests)])
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                lines = head.decode("latin-1").split("\r\n")
                length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
                body = await reader.readexactly(length)
                done[not (lines[0].split(" ")[1] == "200" and body.startswith(b"{"))] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, StopIteration):
                done[1] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
            i += clients
        if conn is not None:
            conn[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    return done[0], done[1], time.perf_counter() - start


CLIENT = {"raw": _closed_loop_raw, "httpx": _closed_loop_httpx}
_client = [_closed_loop_raw]  # set from --client


def _closed_loop(url: str, payloads: list[bytes], clients: int, stop):
    return _client[0](url, payloads, clients, stop)


def throughput(url: str, payloads: list[bytes], clients: int, seconds: float) -> tuple[float, int, float]:
    """Answered requests per second with `clients` concurrent clients, the failed ones, and the
    load generator's own CPU milliseconds per answered request."""
    end = time.perf_counter() + seconds
    cpu0 = sum(psutil.Process().cpu_times()[:2])
    ok, failed, elapsed = asyncio.run(_closed_loop(url, payloads, clients, lambda: time.perf_counter() > end))
    return ok / elapsed, failed, (sum(psutil.Process().cpu_times()[:2]) - cpu0) / max(ok, 1) * 1000


def swaps_under_load(url: str, client: httpx.Client, payloads: list[bytes], versions: list[str], swaps: int) -> tuple[int, int]:
    """(failed, answered) /infer requests of SWAP_CLIENTS clients while `swaps` activations alternate
    between two versions."""
    stop = threading.Event()
    result: list[tuple[int, int, float]] = []
    load = threading.Thread(target=lambda: result.append(asyncio.run(_closed_loop(url, payloads, SWAP_CLIENTS, stop.is_set))))
    load.start()
    try:
        time.sleep(0.5)
        for k in range(swaps):
            client.post(f"/models/{versions[(k + 1) % 2]}/activate").raise_for_status()
            time.sleep(0.2)
    finally:
        stop.set()
        load.join()
    ok, failed, _ = result[0]
    return failed, ok


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time of the daemon process, all its threads (load from other processes
    does not inflate it, unlike wall time)."""
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def libtorch_mapped(pid: int) -> bool:
    """Whether torch's shared library is mapped into the process (imported at any time since it started)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def batch_sizes(client: httpx.Client) -> tuple[float, float]:
    """(forward passes, images) so far, from edgetune_inference_batch_size in /metrics."""
    count = total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("edgetune_inference_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("edgetune_inference_batch_size_sum"):
            total = float(line.split()[-1])
    return count, total


def _settings_fields(code: str | None = None) -> set[str]:
    """The daemon's settings: this checkout's, or those of the checkout `code` (--daemon-code)."""
    if code is None:
        from daemon.ops.config import Settings

        return set(Settings.model_fields)
    out = subprocess.run([sys.executable, "-c", "from daemon.ops.config import Settings; print(' '.join(Settings.model_fields))"],
                         env={**os.environ, "PYTHONPATH": str(Path(code).resolve())}, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def reported_backend(status: dict) -> str:
    """The backend the daemon says it serves; a daemon that does not say serves torch."""
    model = status.get("model") or {}
    return (model.get("serving") or {}).get("backend", "torch")


@contextmanager
def daemon(state_dir: Path, backend: str, log: Path, code: str | None = None) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """`edgetune serve` on `state_dir` with `serving_backend = backend` in its config.toml (from the
    checkout `code` when given); yields (url, process, seconds from process start to /readyz 200)."""
    telemetry = state_dir.parent / "telemetry.json"
    telemetry.write_text(json.dumps({"temperature_c": 45}))
    config = {"telemetry": "simulated", "simulated_telemetry": str(telemetry), "auto_cycles": False, "generalist_fallback": False}
    fields = _settings_fields(code)  # an older checkout may not know every setting
    if "serving_backend" in fields:
        config["serving_backend"] = backend
    if "serving_threads" in fields:
        config["serving_threads"] = 1  # as the in-process forward it is compared with (and torch's OMP_NUM_THREADS=1)
    (state_dir / "config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = shutil.which("edgetune", path=os.path.dirname(sys.executable))
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())} if code else None
    proc = subprocess.Popen([exe, "serve", "--state-dir", str(state_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"edgetune serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        startup = time.perf_counter() - started
        yield url, proc, startup
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def serve_rows(backend: str, state_dir: Path, versions: dict[str, str], fwd: dict[str, Forward], floor: Floor,
               payloads: list[bytes], args) -> DaemonRun:
    """One daemon run for `backend`: start-up, idle RSS, per model the sequential and concurrent
    clients, then the swaps under load. Each wall-time target has a CPU-time twin (the daemon's
    CPU per request against the in-process CPU costs), which other load on the machine does not move."""
    floor_ms, floor_cpu = floor.p50_ms, floor.cpu_ms
    with daemon(state_dir, backend, state_dir.parent / f"serve-{backend}.log", args.daemon_code) as (url, proc, startup):
        client = httpx.Client(base_url=url, timeout=60)
        time.sleep(1.0)
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        reported = reported_backend(client.get("/status").json())
        run = DaemonRun(reported, startup, rss)
        if reported != backend:
            return run
        for name, version in versions.items():
            client.post(f"/models/{version}/activate").raise_for_status()
            if reported_backend(client.get("/status").json()) != backend:
                run.rows.append(Row(backend, name, "served by", float("nan"), note=f"{version} not served by {backend}"))
                continue
            f = fwd[name]
            cpu0 = cpu_seconds(proc)
            seq = sequential(client, "/infer", payloads, args.requests)
            seq_cpu = (cpu_seconds(proc) - cpu0) / (args.requests + 20) * 1000
            bound = 1.5 * (floor_ms + f.batch1_ms + f.decode_ms)
            bound_cpu = 1.5 * (floor_cpu + f.batch1_cpu_ms + f.decode_cpu_ms)
            p50 = percentile(seq, 0.5)
            run.rows += [
                Row(backend, name, "/infer p50, 1 sequential client (ms)", p50,
                    f"<= 1.5 x (floor {floor_ms:.2f} + forward {f.batch1_ms:.2f} + decode {f.decode_ms:.2f}) = {bound:.2f}", p50 <= bound),
                Row(backend, name, "/infer p99, 1 sequential client (ms)", percentile(seq, 0.99)),
                Row(backend, name, "daemon CPU per request, 1 sequential client (ms)", seq_cpu,
                    f"<= 1.5 x CPU (floor {floor_cpu:.2f} + forward {f.batch1_cpu_ms:.2f} + decode {f.decode_cpu_ms:.2f}) = {bound_cpu:.2f}",
                    seq_cpu <= bound_cpu),
            ]
            for clients in CLIENTS:
                cpu0, batches0 = cpu_seconds(proc), batch_sizes(client)
                rate, failed, client_cpu = throughput(url, payloads, clients, args.seconds)
                cpu1, batches1 = cpu_seconds(proc), batch_sizes(client)
                passes, images = batches1[0] - batches0[0], batches1[1] - batches0[1]
                per_request_cpu = (cpu1 - cpu0) / max(rate * args.seconds, 1) * 1000
                target, met = "", None
                if clients == 16:
                    share = floor.rate16 / f.batch16_per_s
                    target, met = (f">= 70% of batch-16 {f.batch16_per_s:.0f}/s = {0.7 * f.batch16_per_s:.0f} (reached {rate / f.batch16_per_s:.0%}; the bare"
                                   f" route reaches {share:.0%}{': no server meets it here' if share < 0.7 else ''})"), rate >= 0.7 * f.batch16_per_s
                note = (f"mean batch {images / passes:.1f}" if passes else "") + f", client CPU {client_cpu:.2f} ms/request" + (f", {failed} failed" if failed else "")
                run.rows.append(Row(backend, name, f"throughput, {clients} clients (requests/s)", rate, target, met, note))
                if clients == 16:
                    cpu_bound = f.batch16_cpu_ms_per_image / 0.7
                    least = floor.cpu16_ms + f.batch16_cpu_ms_per_image + f.decode_cpu_ms  # the bare route, the forward pass, decoding
                    run.rows.append(Row(backend, name, "daemon CPU per request, 16 clients (ms)", per_request_cpu,
                                        f"<= batch-16 CPU per image {f.batch16_cpu_ms_per_image:.2f} / 0.7 = {cpu_bound:.2f}",
                                        per_request_cpu <= cpu_bound,
                                        f"bare route + forward + decode = {least:.2f}" + (": no server meets it here" if least > cpu_bound else "")))
        ordered = list(versions.values())
        failed, answered = swaps_under_load(url, client, payloads, ordered, args.swaps)
        run.rows.append(Row(backend, "both", f"failed requests across {args.swaps} swaps under load", failed, "0", failed == 0,
                            f"of {failed + answered}, {SWAP_CLIENTS} clients"))
        mapped = libtorch_mapped(proc.pid)  # after every request and swap above: torch imported at run time shows here
        run.rows.append(Row(backend, "both", "libtorch mapped into the daemon at the end (1 = yes)", float(mapped),
                            "" if backend == "torch" else "0 (a serving process without torch)", None if backend == "torch" else not mapped))
        client.close()
    return run


def speed_main(args) -> None:
    """--mode speed: the table of issue 21's benchmark."""
    from prune_core.datasets import mnist5k as digits

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-speed-"))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows: list[Row] = []
    try:
        data = digits(32)
        payloads = [jpeg(data.images[i]) for i in range(100)]
        verify = data.images[100:164].numpy()
        dirs = prepare_models(work / "models", args.level)
        template = work / "template" / "state"
        versions = prepare_state(template, dirs)
        floor = http_floor(payloads, args.requests, args.seconds)
        rows += [Row("-", "-", "HTTP floor: bare FastAPI route p50 (ms)", floor.p50_ms),
                 Row("-", "-", "HTTP floor: its server's CPU per request (ms)", floor.cpu_ms),
                 Row("-", "-", "HTTP floor: bare route throughput, 16 clients (requests/s)", floor.rate16,
                     note=f"its server's CPU {floor.cpu16_ms:.2f} ms/request; the bound any server has on this machine")]
        forwards: dict[str, dict[str, Forward]] = {}
        runs: dict[str, DaemonRun] = {}
        for backend in backends:
            state = work / backend / "state"
            shutil.copytree(template, state)
            try:
                forwards[backend] = {name: forward(backend, state / "models" / v, payloads, verify) for name, v in versions.items()}
            except Exception as exc:  # e.g. the backend is not installed: say so in the table
                rows.append(Row(backend, "-", "not run", float("nan"), note=f"{type(exc).__name__}: {exc}"[:160]))
                continue
            for name, f in forwards[backend].items():
                target, met = "", None
                if backend != "torch" and "torch" in forwards:
                    ratio = forwards["torch"][name].batch1_cpu_ms / f.batch1_cpu_ms  # CPU time: other load does not move it
                    wall = forwards["torch"][name].batch1_ms / f.batch1_ms
                    target, met = f">= 2x torch (CPU {ratio:.1f}x, wall {wall:.1f}x)", ratio >= 2
                rows += [Row(backend, name, "forward batch 1, in process (ms)", f.batch1_ms, target, met, f"CPU {f.batch1_cpu_ms:.2f} ms"),
                         Row(backend, name, "forward batch 16, in process (images/s)", f.batch16_per_s,
                             note=f"CPU {f.batch16_cpu_ms_per_image:.2f} ms/image"),
                         Row(backend, name, "decode one request's image (ms)", f.decode_ms, note=f"CPU {f.decode_cpu_ms:.2f} ms")]
            if backend != "torch" and "serving_backend" not in _settings_fields(args.daemon_code):
                rows.append(Row(backend, "-", "daemon", float("nan"), note="not run: this daemon has no serving_backend setting"))
                continue
            run = runs[backend] = serve_rows(backend, state, versions, forwards[backend], floor, payloads, args)
            if run.reported != backend:
                rows.append(Row(backend, "-", "daemon", float("nan"), note=f"asked for {backend}, /status says {run.reported}: not measured"))
                continue
            base = runs.get("torch") if backend != "torch" else None
            rss_target, rss_met = ("<= 300 MiB", run.idle_rss_mib <= 300) if backend != "torch" else ("", None)
            start_target, start_met = ("", None)
            if base is not None:
                start_target, start_met = f">= 3x faster than torch ({base.startup_s / run.startup_s:.1f}x)", base.startup_s >= 3 * run.startup_s
            rows += [Row(backend, "unpruned", "daemon idle RSS (MiB)", run.idle_rss_mib, rss_target, rss_met, "the daemon process, after /readyz"),
                     Row(backend, "unpruned", "daemon start-up to /readyz 200 (s)", run.startup_s, start_target, start_met)]
            rows += run.rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_speed(rows)
    with open(out / "serve_speed.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("backend", "model", "measure", "value", "target", "met", "note"),
                                  *[(r.backend, r.model, r.measure, r.value, r.target, "" if r.met is None else r.met, r.note) for r in rows]])
    print(f"\nwritten {out / 'serve_speed.csv'}")


def print_speed(rows: list[Row]) -> None:
    head = ("backend", "model", "measure", "value", "target", "met", "note")
    cells = [(r.backend, r.model, r.measure, f"{r.value:.2f}", r.target, {None: "", True: "yes", False: "NO"}[r.met], r.note) for r in rows]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in cells:
        print("| " + " | ".join(c) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("speed", "cycle"), default="speed")
    ap.add_argument("--backends", default="torch,onnxruntime", help="speed: serving backends, comma-separated")
    ap.add_argument("--requests", type=int, default=300, help="speed: requests of the sequential client and the HTTP floor")
    ap.add_argument("--level", type=float, default=0.5, help="speed: the pruned model's level (L1, no retraining: speed only)")
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=600, help="cycle: images sent")
    ap.add_argument("--seconds", type=float, default=None, help="length of each latency / throughput window (speed 5, cycle 8)")
    ap.add_argument("--sustain", type=float, default=0.0, help="cycle: seconds of the sustained load test (0: skip)")
    ap.add_argument("--clients", type=int, default=4, help="cycle: client threads in the sustained load test")
    ap.add_argument("--only-sustain", action="store_true", help="cycle: skip the other measurements")
    ap.add_argument("--daemon-code", default=None,
                    help="speed: run the daemon from this checkout (PYTHONPATH), e.g. an older one for a before/after comparison")
    ap.add_argument("--client", choices=sorted(CLIENT), default="raw",
                    help="speed: the concurrent clients' HTTP client (raw: a minimal keep-alive client; httpx: as before)")
    ap.add_argument("--out", default="bench/out/serve_bench")
    args = ap.parse_args()
    _client[0] = CLIENT[args.client]
    if args.mode == "cycle":
        args.seconds = args.seconds or 8.0
        cycle_main(args)
    else:
        args.seconds = args.seconds or 5.0
        speed_main(args)


if __name__ == "__main__":
    main()
