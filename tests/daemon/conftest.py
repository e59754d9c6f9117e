"""Fixtures for the daemon: a trained base model, real images, a real `edgetune serve` process, and
an in-process daemon (Runtime + TestClient, the fake worker, a clock the test moves) for the fast tier."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from prune_core import ModelCard, TrainConfig, build_model, save_model, split_holdout, train
from prune_core.datasets import MNIST_CLASSES, mnist5k

from fake_worker import fake_worker

DEVICE_CLASSES = (1, 4, 7)  # what the "camera" sees


@pytest.fixture(scope="session")
def digits():
    return mnist5k(32)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, digits) -> Path:
    """cifar_small trained briefly on all ten digits (~10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    tr, ho = split_holdout(digits, 0.2)
    model = build_model("cifar_small", 10)
    card = ModelCard("cifar_small", 10, MNIST_CLASSES, 32)
    train(model, tr, ho, card.mean, card.std, TrainConfig(epochs=1, lr=0.05, flip=False))
    save_model(model, card, out)
    return out


def png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def noise_png(seed: int) -> bytes:
    """A unique 32×32 PNG of random pixels (unique per seed, so the buffer never dedupes it)."""
    return png_bytes(torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, 32, 32), dtype=np.uint8)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def device_images(digits) -> list[tuple[bytes, str]]:
    """(PNG bytes, class name) for the device's classes, interleaved, 100 per class."""
    per_class = [torch.nonzero(digits.labels == c).flatten()[:100].tolist() for c in DEVICE_CLASSES]
    out = []
    for row in zip(*per_class):
        for i in row:
            out.append((png_bytes(digits.images[i]), str(int(digits.labels[i]))))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A real `edgetune serve` subprocess on its own state dir, port and simulated telemetry file."""

    def __init__(self, state_dir: Path, model_dir: Path | None, env: dict[str, str]):
        self.state_dir = state_dir
        self.model_dir = model_dir
        self.port = free_port()
        self.telemetry_file = state_dir.parent / f"telemetry-{self.port}.json"
        self.set_telemetry(temperature_c=45.0, power_w=5.0, gpu_load=0.0, cpu_load=10.0)
        self.env = {
            **os.environ,
            "EDGETUNE_TELEMETRY": "simulated",
            "EDGETUNE_SIMULATED_TELEMETRY": str(self.telemetry_file),
            "EDGETUNE_POLL_INTERVAL_S": "0.2",
            "EDGETUNE_IDLE_SECONDS": "0.5",
            "EDGETUNE_MIN_SAMPLES": "30",
            "EDGETUNE_AUTO_CYCLES": "false",
            "EDGETUNE_CYCLE_LEVEL": "0.5",
            "EDGETUNE_CYCLE_EPOCHS": "1",
            "EDGETUNE_CYCLE_FINETUNE_BEFORE": "0",
            "EDGETUNE_CYCLE_CRITERION": "l1",
            "EDGETUNE_MAX_CPU_LOAD": "100",
            "EDGETUNE_MAX_ACCURACY_DROP": "0.05",
            # a candidate the evidence cannot decide is rejected, not kept pending for labels, unless a test asks
            "EDGETUNE_DISAGREEMENT_LABELS": "0",
            # the classic recipe, one step: a cycle of a few epochs (tests of the patient recipe set it)
            "EDGETUNE_CYCLE_RECIPE": "classic",
            "EDGETUNE_CYCLE_DISTIL_BUDGET_S": "0",
            "EDGETUNE_CYCLE_PRUNE_STEPS": "1",
            # torch: no engine build per daemon and cycle (suite time); tests of engines ask for auto
            "EDGETUNE_SERVING_BACKEND": "torch",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.wrap: list[str] = []  # a command prefix, e.g. unshare + mount for the fault tests
        self.log = state_dir.parent / f"serve-{self.port}.log"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_telemetry(self, **values) -> None:
        tmp = self.telemetry_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(self.telemetry_file)

    def start(self, timeout: float = 60) -> "Daemon":
        cmd = [shutil.which("edgetune", path=os.path.dirname(sys.executable)), "serve", "--state-dir", str(self.state_dir), "--port", str(self.port)]
        if self.model_dir is not None:
            cmd += ["--model", str(self.model_dir)]
        self.proc = subprocess.Popen(self.wrap + cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgetune serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"edgetune serve not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def infer(self, image: bytes, label: str | None = None) -> httpx.Response:
        params = {"label": label} if label is not None else {}
        return self.client.post("/infer", content=image, params=params, headers={"content-type": "image/png"})

    def wait_cycle(self, cycle_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.client.get(f"/cycles/{cycle_id}").json()
            if record["state"] in states:
                return record
            time.sleep(0.1)
        raise AssertionError(f"cycle {cycle_id} never reached {states}; last: {record}\n{self.log.read_text()[-2000:]}")


@pytest.fixture
def make_daemon(tmp_path, base_model_dir):
    daemons: list[Daemon] = []

    def make(env: dict[str, str] | None = None, model: bool = True, state_dir: Path | None = None) -> Daemon:
        d = Daemon(state_dir or tmp_path / f"state{len(daemons)}", base_model_dir if model else None, env or {})
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory, base_model_dir):
    """One daemon for a whole test module (for tests that only read or make small changes)."""
    d = Daemon(tmp_path_factory.mktemp("shared") / "state", base_model_dir, {}).start()
    yield d
    d.stop(signal.SIGKILL)


# ---- in process: the fast tier ------------------------------------------------------------------
@pytest.fixture(scope="session")
def untrained_model_dir(tmp_path_factory) -> Path:
    """cifar_small with its initial weights, for tests of the API contract (no training)."""
    out = tmp_path_factory.mktemp("untrained") / "model"
    torch.manual_seed(0)
    save_model(build_model("cifar_small", 10), ModelCard("cifar_small", 10, MNIST_CLASSES, 32), out)
    return out


class FakeClock:
    """The scheduler's clock: starts at the real time and moves only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InProcess:
    """The daemon's Runtime and API in this process, with the fake worker and a FakeClock. The
    scheduler does not poll by itself: a test calls `tick()` (one poll) or `run_until()`."""

    def __init__(self, state_dir: Path, model_dir: Path, worker_target=fake_worker, **settings):
        from fastapi.testclient import TestClient

        from daemon.api import create_app
        from daemon.ops.config import Settings
        from daemon.runtime import Runtime

        self.telemetry_file = state_dir.parent / "telemetry.json"
        self.set_telemetry(temperature_c=45.0, power_w=5.0, gpu_load=0.0, cpu_load=10.0)
        defaults = dict(state_dir=state_dir, telemetry="simulated", simulated_telemetry=self.telemetry_file, device="cpu",
                        idle_seconds=0, min_samples=3, auto_cycles=False, cycle_level=0.5, cycle_epochs=20,
                        cycle_criterion="l1", max_cpu_load=100, max_accuracy_drop=0.05,
                        serving_backend="torch")  # engines cost a build per daemon: their tests ask for them
        self.clock = FakeClock()
        self.rt = Runtime(Settings(**{**defaults, **settings}), model_dir, worker_target=worker_target, clock=self.clock)
        self.rt.start_request_path()  # the buffer's writer and the batcher
        self.client = TestClient(create_app(self.rt))  # no `with`: the lifespan (scheduler thread) does not run

    def set_telemetry(self, **values) -> None:
        self.telemetry_file.write_text(json.dumps(values))

    def settle(self, timeout: float = 30) -> None:
        """Wait until the samples /infer queued behind its answers are committed."""
        deadline = time.monotonic() + timeout
        while self.rt.buffer.queued:
            assert time.monotonic() < deadline, f"{self.rt.buffer.queued} samples still queued"
            time.sleep(0.01)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.rt.scheduler.tick()

    def cycle(self, cycle_id: str) -> dict:
        r = self.client.get(f"/cycles/{cycle_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def run_until(self, cycle_id: str, predicate, max_polls: int = 2000) -> dict:
        """Poll (tick) until `predicate(record)`; the worker gets a few ms between polls."""
        for _ in range(max_polls):
            self.tick()
            record = self.cycle(cycle_id)
            if predicate(record):
                return record
            time.sleep(0.005)
        raise AssertionError(f"cycle {cycle_id} never satisfied the condition after {max_polls} polls: {record}")

    def close(self) -> None:
        self.rt.stop()


@pytest.fixture
def make_inproc(tmp_path, untrained_model_dir):
    made: list[InProcess] = []

    def make(**settings) -> InProcess:
        d = InProcess(tmp_path / f"state{len(made)}", untrained_model_dir, **settings)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def inproc(make_inproc) -> InProcess:
    return make_inproc()
