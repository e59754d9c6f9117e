"""Forward latency and throughput of the serving engines, side by side: torch eager against
onnxruntime (CPU), each with 1 and 2 intra-op threads, for cifar_small unpruned, the same pruned
to level 0.8, and torchvision resnet18 at 32 px.

    python bench/engine_bench.py [--runs 300] [--batch-runs 32] [--rounds 6] [--out bench/out/engine_bench]

Each engine is the daemon's (daemon.engines): uint8 images in, logits out, normalisation included;
onnxruntime's engine is built and verified against torch on real digits first. One child process
per thread count (a 2-thread pool left spinning would slow the 1-thread runs after it); inside
it torch and onnxruntime take turns in `--rounds` rounds so that load from other processes hits
both alike; a number is the median over every timed call. Also times opening an onnxruntime session from model.onnx against
from a pre-optimised copy (the question whether to cache the optimised graph). Writes
engine_bench.json to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import onnxruntime
import torch

from daemon.engines import Backend, load_engine
from daemon.engines.base import Engine, InputSpec
from daemon.engines.build import build_engine
from daemon.engines.eager import TorchEngine
from daemon.engines.ort import ONNX_FILE, session_options
from prune_core import ModelCard, PruneSpec, build_model, count_params, get_criterion, prune_to_level
from prune_core.datasets import MNIST_CLASSES, mnist5k

THREADS = (1, 2)


def models() -> Dict[str, Tuple[str, torch.nn.Module]]:
    """Name -> (architecture, model); the pruned one by L1 at level 0.8 (speed does not need training)."""
    torch.manual_seed(0)
    small = build_model("cifar_small", 10).eval()
    pruned = prune_to_level(small, get_criterion("l1").score(small), PruneSpec(0.8), 32).model.eval()
    return {"cifar_small": ("cifar_small", small), "cifar_small pruned 0.8": ("cifar_small", pruned),
            "resnet18 @32": ("resnet18", build_model("resnet18", 10).eval())}


class Timed:
    """One engine at one thread count, collecting per-call wall and process CPU seconds. On a
    machine loaded by other processes a 1-thread call's CPU time is what it would take on an idle
    core, while its wall time also holds the waits for a core (longer calls are cut more often)."""

    def __init__(self, label: str, engine: Engine, threads: int):
        self.label, self.engine, self.threads = label, engine, threads
        self.times: Dict[int, List[float]] = {}
        self.cpu: Dict[int, List[float]] = {}

    def run(self, batch: np.ndarray, calls: int) -> None:
        for _ in range(3):
            self.engine.logits(batch)
        times = self.times.setdefault(len(batch), [])
        cpu = self.cpu.setdefault(len(batch), [])
        for _ in range(calls):
            start, start_cpu = time.perf_counter(), time.process_time()
            self.engine.logits(batch)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)

    def median_ms(self, batch: int) -> float:
        return statistics.median(self.times[batch]) * 1e3

    def cpu_ms(self, batch: int) -> float:
        return statistics.median(self.cpu[batch]) * 1e3

    def quartiles_ms(self, batch: int) -> tuple:
        q = np.percentile(self.times[batch], [25, 75]) * 1e3
        return float(q[0]), float(q[1])


def session_start_ms(path: Path, repeats: int = 5) -> float:
    def once() -> float:
        start = time.perf_counter()
        onnxruntime.InferenceSession(str(path), sess_options=session_options(1), providers=["CPUExecutionProvider"])
        return time.perf_counter() - start
    return statistics.median(once() for _ in range(repeats)) * 1e3


def optimised_copy(path: Path) -> Path:
    target = path.with_name("model.optimised.onnx")
    options = session_options(1)
    options.optimized_model_filepath = str(target)
    onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return target


def bench_model(name: str, arch: str, model: torch.nn.Module, images: np.ndarray, work: Path, args, threads: int) -> dict:
    card = ModelCard(arch, 10, MNIST_CLASSES, 32)
    version = work / name.replace(" ", "_").replace("@", "")
    version.mkdir()
    print(f"[{name}] building and verifying the onnxruntime engine", file=sys.stderr, flush=True)
    info = build_engine(model, card, version, Backend.ONNXRUNTIME, images[:64], threads=1)
    spec = InputSpec.of(card)
    torch.set_num_threads(threads)
    timed = [Timed("torch eager", TorchEngine(model, spec), threads),
             Timed("onnxruntime", load_engine(version, Backend.ONNXRUNTIME, threads=threads), threads)]
    one, sixteen = images[:1], images[:16]
    for _ in range(args.rounds):
        for entry in timed:
            entry.run(one, args.runs // args.rounds)
            entry.run(sixteen, args.batch_runs // args.rounds)
    print(f"[{name}] timed at {threads} thread(s)", file=sys.stderr, flush=True)
    onnx_path = version / ONNX_FILE
    plain = optimised = None
    if threads == 1:
        plain, optimised = session_start_ms(onnx_path), session_start_ms(optimised_copy(onnx_path))
    rows = []
    for entry in timed:
        lo, hi = entry.quartiles_ms(1)
        rows.append({
            "model": name, "params": count_params(model), "engine": entry.label, "threads": entry.threads,
            "batch1_ms": entry.median_ms(1), "batch1_q25_ms": lo, "batch1_q75_ms": hi,
            "batch16_images_per_s": 16 / (entry.median_ms(16) / 1e3),
            "batch1_cpu_ms": entry.cpu_ms(1), "batch16_cpu_images_per_s": 16 / (entry.cpu_ms(16) / 1e3),
        })
    return {"rows": rows, "verification": info.verification.__dict__, "session_start_ms": plain, "optimised_start_ms": optimised}


def print_tables(results: List[dict]) -> None:
    print("| model | params | engine | threads | batch 1 wall ms (median, IQR) | vs torch | batch 1 CPU ms | vs torch "
          "| batch 16 wall img/s | vs torch | batch 16 img/CPU-s | vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        rows = result["rows"]
        torch_rows = {r["threads"]: r for r in rows if r["engine"] == "torch eager"}
        for r in sorted(rows, key=lambda r: (r["engine"] != "torch eager", r["threads"])):
            ref = torch_rows[r["threads"]]
            print(f"| {r['model']} | {r['params']:,} | {r['engine']} | {r['threads']} | "
                  f"{r['batch1_ms']:.3f} ({r['batch1_q25_ms']:.3f}–{r['batch1_q75_ms']:.3f}) | "
                  f"{ref['batch1_ms'] / r['batch1_ms']:.2f}× | {r['batch1_cpu_ms']:.3f} | {ref['batch1_cpu_ms'] / r['batch1_cpu_ms']:.2f}× | "
                  f"{r['batch16_images_per_s']:,.0f} | {r['batch16_images_per_s'] / ref['batch16_images_per_s']:.2f}× | "
                  f"{r['batch16_cpu_images_per_s']:,.0f} | {r['batch16_cpu_images_per_s'] / ref['batch16_cpu_images_per_s']:.2f}× |")
    print()
    print("| model | verification max abs diff (64 digits) | top-1 agreement | session start from model.onnx ms | from optimised copy ms |")
    print("|---|---|---|---|---|")
    for result in results:
        v = result["verification"]
        print(f"| {result['rows'][0]['model']} | {v['max_abs_diff']:.2e} | {v['top1_agreement']:.3f} | "
              f"{result['session_start_ms']:.1f} | {result['optimised_start_ms']:.1f} |")


def child(args) -> None:
    """Time every model at `args.threads` threads; JSON results on stdout."""
    images = mnist5k(32).images[:64].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(name, arch, model, images, Path(tmp), args, args.threads) for name, (arch, model) in models().items()]
    json.dump(results, sys.stdout)


def merged(per_threads: List[List[dict]]) -> List[dict]:
    """One result per model: the rows of every thread count; verification and session start from 1 thread."""
    out = []
    for parts in zip(*per_threads):
        first = dict(parts[0])
        first["rows"] = [row for part in parts for row in part["rows"]]
        out.append(first)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 calls per engine (split over the rounds)")
    p.add_argument("--batch-runs", type=int, default=32, help="timed batch-16 calls per engine")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("bench/out/engine_bench"))
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # set for the child processes
    args = p.parse_args()
    if args.threads:
        return child(args)
    started = time.time()
    per_threads = []
    for threads in THREADS:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [sys.executable, __file__, "--threads", str(threads), "--runs", str(args.runs),
                   "--batch-runs", str(args.batch_runs), "--rounds", str(args.rounds)]
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, check=True, text=True)
        per_threads.append(json.loads(done.stdout))
    results = merged(per_threads)
    print_tables(results)
    print(f"\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"{time.time() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                                                            "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
