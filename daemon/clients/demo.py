"""`edgetune demo`: the whole loop, live, on a fresh machine, offline, on a CPU. A client of the daemon:
it starts `edgetune serve` and drives it through its HTTP API.

1. A state dir (default ./demo-state) with a base model trained once on MNIST-5k, reused after.
2. A real `edgetune serve` child process on 127.0.0.1, on a fresh daemon state, configured so that
   its own idle gate starts one cycle as soon as the camera has been quiet for a few seconds.
3. A "camera" that only sees a few digit classes sends images the base model never saw through
   POST /infer; a user labels one image in N (`?label=`).
4. The camera stops; the gate opens; the daemon prunes, retrains, validates and hot-swaps.
5. Before/after: params, MACs, latency, top-1 on held-out images of those classes that were never
   sent, and the swap as /status reports it.
The daemon is then left running until Ctrl-C, or stopped at once with --once.
"""
from __future__ import annotations

import argparse
import fcntl
import io
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from prune_core.data import ImageSet, batches
from prune_core.label_shift import correct
from prune_core.device import pick_device
from prune_core.digits import Digits, base_model, digits, only, parse_classes
from prune_core.measure import count_macs, count_params, evaluate, latency_ms
from prune_core.model_format import load_model

from prune_core import argtypes

from ..workers.child_process import parent_death_signal
from ..cycles.cycle_state import CycleState
from .http import ApiClient, ApiError, Unreachable

HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CONFIG_HEADER = "# written by `edgetune demo`\n"


# ---- options and daemon configuration ---------------------------------------------------
@dataclass
class DemoOptions:
    state_dir: Path
    classes: list[int]
    images_per_class: int = 200
    label_every: int = 0
    base_epochs: int = 4
    cycle_epochs: int = 10
    cycle_min_steps: int = 40
    distil_budget_s: float = 0.0
    level: str | float = 0.8
    idle_seconds: float = 3.0
    port: int | None = None
    telemetry: str = "auto"
    device: str | None = None
    once: bool = False
    timeout_s: float = 900.0


def on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()  # every L4T (JetPack) image has it, jtop or not


def pick_telemetry(choice: str) -> tuple[str, str]:
    """(the daemon's `telemetry` setting, why). Real sensors on a Jetson, where the default limits
    (75 °C, 85 % CPU, 50 % GPU) mean something; none elsewhere, where a desktop's CPU temperature
    or a shared machine's load would keep the gate shut for reasons that have nothing to do with it."""
    if choice == "real" or (choice == "auto" and on_jetson()):
        return "auto", "this machine's sensors (jtop or sysfs) with the daemon's default thermal, power and load limits"
    return "simulated", "none (not a Jetson: no thermal/power/load limits; --telemetry real uses this machine's sensors)"


def daemon_config(opts: DemoOptions, telemetry: str, samples: int) -> dict[str, Any]:
    """The daemon's settings for the demo: a periodic cycle once all `samples` are buffered and the
    camera has been quiet for `idle_seconds`; everything else is the daemon's default."""
    config: dict[str, Any] = {
        "telemetry": telemetry,
        "auto_cycles": True,
        "idle_seconds": opts.idle_seconds,
        "poll_interval_s": 0.5,
        "min_samples": samples,
        "new_samples_per_cycle": samples,
        "cycle_level": opts.level,
        "cycle_criterion": "activation",
        "cycle_finetune_before": 1,
        "cycle_epochs": opts.cycle_epochs,
        "cycle_min_steps": opts.cycle_min_steps,
        # the patient recipe for cycle_epochs per prune step (a device idles for hours, a demo does not),
        # or for a time budget
        "cycle_distil_budget_s": opts.distil_budget_s,
        # the level search keeps only probes at least as accurate as the fine-tuned unpruned
        # model, so the acceptance rule (at most 1 point below the served model) rarely says no
        "cycle_tolerance": 0.0,
        # a demo buffer holds a few dozen held-out samples: halved, the verdict would rest on a
        # dozen, where one image is 8 points; the demo judges on all of them (cycle_judge_share)
        "cycle_judge_share": 0.0,
    }
    if opts.device:
        config["device"] = opts.device
    return config


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Flat TOML (strings, numbers, booleans): JSON's spelling of those is valid TOML."""
    path.write_text(CONFIG_HEADER + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))


def pick_port(requested: int | None) -> int:
    """`requested`, else 8000 when free, else any free port."""
    if requested is not None:
        return requested
    for port in (DEFAULT_PORT, 0):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


# ---- the daemon as a child process and its API ------------------------------------------
class Ended(BaseException):
    """SIGTERM or SIGHUP (a process manager, a closed terminal): raised in the demo's main thread,
    like KeyboardInterrupt for Ctrl-C, so the way out stops the daemon. The exit status is 128+signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_end_demo() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise `Ended`; once raised, further ones are ignored so the clean-up
    (stopping the daemon) is not cut short."""
    def end(signum: int, frame: Any) -> None:
        for sig in ENDING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Ended(signum)

    previous = {sig: signal.signal(sig, end) for sig in ENDING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServeProcess:
    """`edgetune serve` in its own session: Ctrl-C reaches only the demo, which stops it cleanly.
    It also gets SIGTERM from the kernel if the demo dies without stopping it (SIGKILL)."""

    def __init__(self, state_dir: Path, model_dir: Path, port: int, log: Path):
        self.cmd = [sys.executable, "-m", "daemon.cli", "serve", "--state-dir", str(state_dir), "--port", str(port), "--model", str(model_dir)]
        self.url = f"http://{HOST}:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, api: ApiClient, timeout: float = 120) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=parent_death_signal(signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                if api.get("/readyz", accept=(503,)).get("ready"):
                    return
            except Unreachable:
                pass
            time.sleep(0.3)
        raise DemoError(f"edgetune serve was not ready after {timeout:g}s{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"edgetune serve exited with code {self.proc.returncode}{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return f"; the end of its log ({self.log}):\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM (a clean shutdown: the cycle worker is stopped, the buffer closed), then SIGKILL."""
        if self.proc is None:
            return "not started"
        if self.proc.poll() is not None:
            return f"had already exited with code {self.proc.returncode}"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: no waiting for the clean shutdown
            self.proc.kill()
            self.proc.wait()
            return f"killed after not stopping within {timeout:g}s"
        # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit
        return "stopped cleanly" if self.proc.returncode in (0, -signal.SIGTERM) else f"exited with code {self.proc.returncode}"


class DemoError(RuntimeError):
    """Something failed (not a rejected cycle: that is an answer, not a failure)."""


# ---- the camera -------------------------------------------------------------------------
def png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def camera_stream(data: ImageSet, classes: list[int], per_class: int) -> list[tuple[bytes, str]]:
    """(PNG, class name) for up to `per_class` images of each class, shuffled, without duplicates
    (the buffer would store a duplicate once, and the demo counts on every image being a sample)."""
    picked = [i for c in classes for i in torch.nonzero(data.labels == c).flatten()[:per_class].tolist()]
    random.Random(0).shuffle(picked)
    seen, out = set(), []
    for i in picked:
        png = png_bytes(data.images[i])
        if png not in seen:
            seen.add(png)
            out.append((png, str(int(data.labels[i]))))
    return out


@dataclass
class StreamStats:
    sent: int = 0
    labelled: int = 0
    correct: int = 0
    latency_ms: list[float] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)

    @property
    def top1(self) -> float:
        return self.correct / max(1, self.sent)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latency_ms) if self.latency_ms else float("nan")


class Bars:
    """rich progress bars on a terminal. Elsewhere (logs, pipes, CI), where rich would draw only the
    last frame, no bars but a plain line at each milestone, so a log shows how far the demo got."""

    def __init__(self) -> None:
        self.console = Console(highlight=False)
        self.live = self.console.is_terminal
        self.bars = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(),
            console=self.console,
        )

    def __enter__(self) -> Bars:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bars.stop()

    def add(self, description: str, total: int | None = None, visible: bool = True) -> TaskID:
        return self.bars.add_task(description, total=total, info="", visible=visible)

    def update(self, task: TaskID, milestone: str | None = None, **fields: Any) -> None:
        """Move `task`; `milestone` is the line printed instead where no bar is drawn."""
        self.bars.update(task, **fields)
        if milestone is not None and not self.live:
            self.say(milestone)

    def say(self, text: str) -> None:
        """A line above the bars."""
        self.bars.console.print(text, markup=False, soft_wrap=True)


def replay(api: ApiClient, stream: list[tuple[bytes, str]], label_every: int, serve: ServeProcess, prefix: str,
           show_prior: bool = False) -> StreamStats:
    stats = StreamStats()
    step = max(1, len(stream) // 10)
    with Bars() as bars:
        task = bars.add(prefix, total=len(stream))
        for n, (png, name) in enumerate(stream, 1):
            label = name if label_every and n % label_every == 0 else None
            try:
                reply = api.infer(png, label)
            except Unreachable:
                serve.check()
                raise
            stats.sent += 1
            stats.labelled += label is not None
            stats.correct += reply["top"][0]["class"] == name
            stats.latency_ms.append(reply["latency_ms"])
            stats.versions.add(reply["model_version"])
            info = f"{stats.labelled} labelled, served by {reply['model_version']}: top-1 {stats.top1:.3f}, /infer {stats.p50_ms:.1f} ms p50"
            milestone = n % step == 0 or n == len(stream)
            bars.update(task, completed=n, info=info, milestone=f"{prefix} {n}/{len(stream)} images, {info}" if milestone else None)
            if milestone and show_prior:
                bars.say(f"[prior] {describe_prior(api.get('/status').get('label_shift'))}")
    return stats


def describe_prior(shift: dict | None) -> str:
    """'1 33%, 4 32%, 7 31%, others 4% (correcting answers)': the daemon's estimate of the camera's classes."""
    if not shift or not shift.get("estimate"):
        return f"estimating the camera's classes ({(shift or {}).get('reason', 'no estimate yet')})"
    ranked = sorted(shift["estimate"].items(), key=lambda kv: -kv[1])
    top = [(name, share) for name, share in ranked if share >= 0.05]
    rest = 1 - sum(share for _, share in top)
    text = ", ".join(f"{name} {share:.0%}" for name, share in top) + (f", others {rest:.0%}" if rest >= 0.005 else "")
    return f"{text} ({'correcting answers' if shift.get('applied') else shift.get('reason')})"


# ---- waiting for the cycle --------------------------------------------------------------
STEPS = {"snapshot": "reading the buffer", "rank": "fine-tune, rank, prune, retrain", "validate": "validating", "write": "writing the new version"}


def describe_cycle(c: dict) -> str:
    text = f"cycle {c['id']} ({c['trigger']}): {c['state']}"
    if c.get("step"):
        text += f", {STEPS.get(c['step'], c['step'])}"
    if c["request"]["level"] == "auto" and c.get("step") == "rank":
        text += f" (level search, probe {len(c.get('probes') or []) + 1})"
    return text


def retraining(probe: dict) -> str:
    """'retrained 5 epochs, kept epoch 4' (and where early stopping fired): how the probe's model was chosen."""
    text = f"retrained {probe.get('retrain_epochs', 0)} epochs, kept epoch {probe.get('kept_epoch', 0)}"
    return text + (f", early stop after epoch {probe['early_stop_epoch']}" if probe.get("early_stop_epoch") else "")


def wait_for_cycle(api: ApiClient, serve: ServeProcess, timeout_s: float) -> dict:
    """Poll /status until the daemon's own cycle ends; print the gate's reasons, steps and probes,
    with a bar for the cycle's step and one for the epoch being trained."""
    deadline = time.monotonic() + timeout_s
    reasons, announced, probes_shown, step = None, False, 0, None
    with Bars() as bars:
        overall = bars.add("[gate]")
        training = bars.add("[train]", visible=False)
        while time.monotonic() < deadline:
            serve.check()
            status = api.get("/status")
            cycle = status["cycle"]
            if cycle is None:
                why = status["scheduler"]["why_not_running"]
                kinds = [r.split(":")[0] for r in why]  # "busy: last inference 0.4s ago" → "busy"
                if why and kinds != reasons:
                    bars.say(f"[gate] closed: {'; '.join(why)}")
                    reasons = kinds
                bars.update(overall, info="closed" if why else "open")
                time.sleep(0.5)
                continue
            if not announced:
                announced = True
                bars.say(f"[gate] open: the daemon started cycle {cycle['id']} by itself ({cycle['trigger']})")
                bars.update(overall, description="[cycle]")
            for probe in cycle["probes"][probes_shown:]:
                verdict = (" (within the search's tolerance)" if probe["feasible"] else " (too lossy)") if cycle["request"]["level"] == "auto" else ""
                bars.say(f"[cycle] level {probe['level']:.2f}: held-out top-1 {probe['accuracy']:.3f} with {probe['params']:,} params{verdict}"
                         f" ({retraining(probe)})")
            probes_shown = len(cycle["probes"])
            if CycleState(cycle["state"]).final:
                return cycle
            new_step = cycle.get("step") != step
            step = cycle.get("step")
            described = describe_cycle(cycle)
            bars.update(overall, info=described, milestone=f"[cycle] {described}" if new_step else None)
            p = cycle.get("progress") or {}
            if isinstance(p.get("batches_per_epoch"), int):
                loss = f"loss {p['loss']:.3f}" if isinstance(p.get("loss"), (int, float)) else ""
                bars.update(training, visible=True, description=f"[train] epoch {p.get('epoch')}", total=p["batches_per_epoch"],
                            completed=p.get("batch", 0), info=loss)
            time.sleep(0.5)
    raise DemoError(f"no cycle finished within {timeout_s:g}s; last /status: {json.dumps(status)[:1500]}")


# ---- before/after -----------------------------------------------------------------------
@dataclass
class Row:
    name: str
    version: str
    params: int
    macs: int
    forward_ms: float
    infer_ms: float
    top1: float


def measure(name: str, version: str, model_dir: Path, held: ImageSet, infer_ms: float, device: torch.device,
            prior: dict | None = None) -> Row:
    """The served version's own weights, read from the daemon's model store; with `prior` (class name:
    share), its calibrated answers corrected to that class prior as the daemon serves them."""
    model, card = load_model(model_dir, device)
    if prior is None:
        top1 = evaluate(model, batches(held, 256, card.mean, card.std, device=device)).top1
    else:
        target = [prior[name] for name in card.class_names]
        with torch.no_grad():
            logits = torch.cat([model(x).float().cpu() for x, _ in batches(held, 256, card.mean, card.std, device=device)])
        probs = card.calibration().apply(logits.numpy())
        top1 = float((correct(probs, card.prior(), target).argmax(1) == held.labels.numpy()).mean())
    return Row(name, version, count_params(model), count_macs(model, card.input_size), forward_ms(model, card.input_size), infer_ms, top1)


def forward_ms(model: torch.nn.Module, input_size: int) -> float:
    """Batch-1 forward latency on one CPU thread (or the GPU): with several threads on a CPU that other
    processes keep busy, a thread descheduled at every synchronisation point inflates it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return latency_ms(model, input_size)
    finally:
        torch.set_num_threads(threads)


def print_table(rows: list[Row], classes: list[int], held: int) -> None:
    head = f"{'':<8}{'version':>8}{'params':>11}{'MACs':>9}{'forward ms':>12}{'/infer ms':>11}   top-1 on {held} held-out {','.join(map(str, classes))}"
    print(head)
    for r in rows:
        print(f"{r.name:<8}{r.version:>8}{r.params:>11,}{r.macs / 1e6:>8.1f}M{r.forward_ms:>12.2f}{r.infer_ms:>11.1f}   {r.top1:.4f}")
    print(
        "forward ms: one image through the model in this process, one CPU thread or the GPU (median of 30); /infer ms: the daemon's own time per\n"
        "request (decode + forward), median over the camera stream before and over a replay of 100 of its images after.",
    )


# ---- the demo ---------------------------------------------------------------------------
@contextmanager
def state_lock(state: Path) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another `edgetune demo` is using {state} (its daemon may still be running); stop it first") from None
        yield


LAST_RUN = "last-run.json"  # in the state dir: where the last run's cycle left the daemon, as /status said


def note_run(state: Path, status: dict) -> None:
    """Keep what /status said after this run's cycle, for the next run's first line (the next run
    starts a fresh daemon state; the demo reads the daemon only through its API)."""
    (state / LAST_RUN).write_text(json.dumps({"version": status["model"]["version"], "params": status["model"]["params"],
                                              "cycle": status["cycle"]["state"]}))


def previous_run(state: Path) -> str | None:
    """The note `note_run` left, once: None where the last run ended before its cycle did."""
    note = state / LAST_RUN
    try:
        last = json.loads(note.read_text())
        note.unlink()
        return f"the previous run left {last['version']} active ({last['params']:,} params) after its cycle was {last['cycle']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def replaceable(daemon_dir: Path) -> bool:
    """Absent, empty, or a daemon state an earlier demo made (never someone else's directory)."""
    config = daemon_dir / "config.toml"
    if not daemon_dir.exists() or not any(daemon_dir.iterdir()):
        return True
    return config.is_file() and config.read_text(errors="replace").startswith(CONFIG_HEADER)


def log(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(opts: DemoOptions) -> int:
    started = time.monotonic()
    state = opts.state_dir.resolve()
    with state_lock(state):
        device = pick_device(opts.device)
        data: Digits = digits()
        t0 = time.monotonic()
        _, _, trained = base_model(state / "base", data, opts.base_epochs, device)
        if trained:
            log(f"trained the base model (cifar_small, all 10 digits, {len(data.base)} images, {opts.base_epochs} epochs) in {time.monotonic() - t0:.0f}s")
        else:
            log(f"reusing the base model in {state / 'base'} (delete it to retrain)")

        stream = camera_stream(data.camera, opts.classes, opts.images_per_class)
        held = only(data.held, opts.classes)
        daemon_dir = state / "daemon"
        if (before := previous_run(state)) is not None:
            log(f"{before}; starting again from the base model on a fresh daemon state")
        if not replaceable(daemon_dir):
            raise DemoError(f"{daemon_dir} exists but was not made by `edgetune demo`; not replacing it")
        shutil.rmtree(daemon_dir, ignore_errors=True)
        daemon_dir.mkdir()
        telemetry, why = pick_telemetry(opts.telemetry)
        write_toml(daemon_dir / "config.toml", daemon_config(opts, telemetry, len(stream)))
        port = pick_port(opts.port)
        serve = ServeProcess(daemon_dir, state / "base", port, state / "serve.log")
        api = ApiClient(f"http://{HOST}:{port}")
        log(f"starting `edgetune serve --state-dir {daemon_dir} --port {port}` (settings in {daemon_dir / 'config.toml'}, log in {serve.log})")
        log(f"telemetry: {why}")
        try:
            serve.start(api)
            return _live(opts, state, serve, api, stream, held, device, started)
        except (KeyboardInterrupt, Ended) as exc:
            print(flush=True)
            log(f"interrupted{f' by {exc}' if isinstance(exc, Ended) else ''}")
            raise
        finally:
            api.close()
            if serve.alive():
                log(f"daemon {serve.stop()}")


def _live(opts: DemoOptions, state: Path, serve: ServeProcess, api: ApiClient, stream: list, held: ImageSet, device, started: float) -> int:
    status = api.get("/status")
    log(f"serving {status['model']['version']} ({status['model']['params']:,} params) at {serve.url} on {status['model']['device']}")
    names = ",".join(map(str, opts.classes))
    labels = f"a user labels 1 image in {opts.label_every}" if opts.label_every else "no labels"
    log(f"the camera sees only digits {names}: {len(stream)} images the base model never saw, through POST /infer ({labels})")
    t0 = time.monotonic()
    seen = replay(api, stream, opts.label_every, serve, "[camera]", show_prior=True)
    log(f"the camera stopped after {time.monotonic() - t0:.0f}s; the daemon starts a cycle by itself once idle for {opts.idle_seconds:g}s")

    t0 = time.monotonic()
    cycle = wait_for_cycle(api, serve, opts.timeout_s)
    outcome = CycleState(cycle["state"])
    m = cycle.get("metrics") or {}
    log(f"cycle {outcome} after {time.monotonic() - t0:.0f}s: {cycle['reason']}")
    if outcome not in (CycleState.ACCEPTED, CycleState.REJECTED):
        raise DemoError(f"the cycle {outcome}: {cycle['reason']}{serve.log_tail()}")

    models = state / "daemon" / "models"
    rows = [measure("before", cycle["version_before"], models / cycle["version_before"], held, seen.p50_ms, device)]
    if outcome is CycleState.REJECTED:
        shift = api.get("/status").get("label_shift") or {}
        estimate = shift.get("estimate") if shift.get("applied") else None
    else:  # the prior the cycle's teacher was corrected to
        estimate = ((cycle.get("metrics") or {}).get("teacher") or {}).get("prior")
    if estimate:  # the same base model, its answers corrected to the camera's estimated classes: no training, no labels
        rows.insert(1, measure("+prior", cycle["version_before"], models / cycle["version_before"], held, seen.p50_ms, device, estimate))
    if outcome is CycleState.ACCEPTED:
        after = replay(api, stream[:100], 0, serve, "[replay]")
        rows.append(measure("after", cycle["version_after"], models / cycle["version_after"], held, after.p50_ms, device))
    print()
    print_table(rows, opts.classes, len(held))
    if outcome is CycleState.REJECTED:
        print(
            f"\nThe cycle was REJECTED by the acceptance rule ({cycle['reason']}); the candidate had "
            f"{m.get('params_after', 0):,} params and is not kept. Still serving {cycle['version_before']}.",
        )
    status = api.get("/status")
    note_run(state, status)
    print("\n/status after the cycle:")
    print(json.dumps({
        "model": {k: status["model"][k] for k in ("version", "params", "macs")},
        "cycle": {k: status["cycle"][k] for k in ("id", "trigger", "state", "version_before", "version_after", "reason")},
    }, indent=2, ensure_ascii=False))
    log(f"wall time {time.monotonic() - started:.0f}s")

    if opts.once:
        log(f"daemon {serve.stop()}")
        return 0
    first = int(torch.nonzero(held.labels == opts.classes[0])[0])
    sample = state / f"digit-{opts.classes[0]}.png"
    sample.write_bytes(png_bytes(held.images[first]))
    print(
        f"\nThe daemon keeps running at {serve.url} (docs at {serve.url}/docs). Try:\n"
        f"  curl {serve.url}/status\n"
        f"  curl {serve.url}/cycles\n"
        f"  curl -X POST {serve.url}/infer -H 'content-type: image/png' --data-binary @{sample}\n"
        f"  curl -X POST {serve.url}/models/{cycle['version_before']}/activate     # roll back\n"
        "Ctrl-C stops it.", flush=True,
    )
    try:
        while serve.alive():
            time.sleep(1)
    except KeyboardInterrupt:  # the normal way out
        print(flush=True)
        log(f"daemon {serve.stop()}")
        return 0
    raise DemoError(f"the daemon exited with code {serve.proc.returncode}{serve.log_tail()}")


# ---- command line -----------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """`edgetune demo`'s arguments and command."""
    p.add_argument("--state-dir", default="demo-state", help="base model, daemon state and log (reused: the base model is trained once)")
    p.add_argument("--classes", default="1,4,7", help="the digits the camera sees")
    p.add_argument("--images-per-class", type=argtypes.positive_int, default=200, help="camera images per class (at most ~200 exist)")
    p.add_argument("--label-every", type=argtypes.non_negative_int, default=0, help="the user labels every Nth image (default 0: none, as on a real device)")
    p.add_argument("--base-epochs", type=argtypes.positive_int, default=4, help="base model training (first run only)")
    p.add_argument("--cycle-epochs", type=argtypes.non_negative_int, default=10, help="retraining epochs per prune step in the cycle")
    p.add_argument("--cycle-min-steps", type=argtypes.non_negative_int, default=40, help="at least this many SGD steps per retraining")
    p.add_argument("--distil-budget", type=argtypes.non_negative_float, default=0.0,
                   help="seconds of patient distillation in the cycle (default 0: --cycle-epochs per prune step)")
    p.add_argument("--level", type=argtypes.level, default=0.8, help="fraction of parameters to remove (between 0 and 1), or 'auto' (the level search: slower)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="camera silence before the gate counts the device idle")
    p.add_argument("--port", type=int, default=None, help="default 8000, or a free port when 8000 is taken")
    p.add_argument("--telemetry", choices=["auto", "real", "simulated"], default="auto", help="auto: real on a Jetson, none elsewhere")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the cycle")
    p.add_argument("--once", action="store_true", help="stop the daemon and exit after the before/after table")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    opts = DemoOptions(
        state_dir=Path(args.state_dir), classes=parse_classes(args.classes), images_per_class=args.images_per_class,
        label_every=args.label_every, base_epochs=args.base_epochs, cycle_epochs=args.cycle_epochs,
        cycle_min_steps=args.cycle_min_steps, distil_budget_s=args.distil_budget, level=args.level, idle_seconds=args.idle_seconds, port=args.port,
        telemetry=args.telemetry, device=args.device, once=args.once, timeout_s=args.timeout,
    )
    try:
        with signals_end_demo():
            code = run_demo(opts)
    except (DemoError, ApiError, Unreachable) as exc:
        print(f"edgetune demo: failed: {exc}", file=sys.stderr)
        code = 1
    except Ended as end:  # run_demo stopped the daemon on the way out
        print(f"edgetune demo: ended by {end}", file=sys.stderr)
        code = 128 + end.signum
    if code:
        raise SystemExit(code)
