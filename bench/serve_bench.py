"""Benchmark a real `edgetune serve`: ingest rate, /infer latency idle vs during a cycle, failed
requests across repeated hot-swaps, swap latency, cycle time and peak RSS; and a sustained load
test (--sustain S): several clients hold /infer for S seconds while cycles and swaps keep
happening, reporting requests/s, p50/p99 and failed requests.

    python bench/serve_bench.py [--swaps 20] [--out bench/out/serve_bench]
    python bench/serve_bench.py --only-sustain --sustain 240 --clients 4

Prints a table and writes serve_bench.csv. Everything runs on loopback against a temporary
state directory; the model is the demo's small CNN trained for one epoch on MNIST-5k.
"""
from __future__ import annotations

import argparse
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
import threading
import time
from pathlib import Path

import httpx
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each latency window")
    ap.add_argument("--sustain", type=float, default=0.0, help="seconds of the sustained load test (0: skip)")
    ap.add_argument("--clients", type=int, default=4, help="client threads in the sustained load test")
    ap.add_argument("--only-sustain", action="store_true", help="skip the other measurements")
    ap.add_argument("--out", default="bench/out/serve_bench")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
