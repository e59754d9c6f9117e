"""The /status document: the served model, the buffer, the scheduler and gate, telemetry and the
current cycle. Built from snapshots, so it is tested without a daemon or a clock."""
from __future__ import annotations

import time

from .config import Settings
from ..cycles.cycle_state import CycleState
from ..cycles.gate import Gate
from ..cycles.scheduler import SchedulerView
from ..serving.generalist import GeneralistWatch
from ..serving.prior_adapter import PriorAdapter
from ..serving.serving import Served

IDLE = "idle"


def backend_section(model: Served, rebuild: dict | None) -> dict:
    """Which backend serves, how fast (median batch-1 forward, measured at load), why each other
    backend does not, and the background engine rebuild."""
    selection = model.selection
    return {"backend": model.backend.value, "engine": model.engine.name, "latency_ms": model.latency_ms,
            "measured_ms": {b.value: ms for b, ms in selection.latency_ms.items()},
            "skipped": {b.value: why for b, why in selection.skipped.items()},
            "rebuild": rebuild}


def model_section(model: Served | None, rebuild: dict | None = None) -> dict | None:
    if model is None:
        return None
    return {"version": model.version, "arch": model.card.arch, "params": model.params, "macs": model.macs,
            "input_size": model.card.input_size, "num_classes": model.card.num_classes, "device": model.device,
            "serving": backend_section(model, rebuild)}


def buffer_section(stats: dict, class_names: list[str]) -> dict:
    """The buffer's stats with class indices replaced by the model's class names."""
    names = class_names
    per_class = {(names[k] if isinstance(k, int) and 0 <= k < len(names) else "unknown"): n for k, n in stats["per_class"].items()}
    return {**stats, "per_class": per_class}


def scheduler_section(view: SchedulerView, settings: Settings, gate: Gate, now: float) -> dict:
    current = view.current
    state = current.state.value if current is not None and current.state.active else IDLE
    g = view.gate
    failures, not_before = view.backoff.failures, view.backoff.not_before
    if not_before is not None and not_before <= now:
        not_before = None
    why = g.reasons if state in (IDLE, CycleState.WAITING, CycleState.PAUSED) else []
    if not_before and state == IDLE:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(not_before))
        why = why + [f"{failures} failed cycles in a row: next automatic cycle not before {when}"]
    return {
        "state": state,
        "gate_open": g.open,
        "idle": g.idle,
        "load_ok": g.load_ok,
        "thermal_ok": g.thermal_ok,
        "power_ok": g.power_ok,
        "power_budget_w": gate.power_budget(view.reading),  # the current power mode's, if configured
        "samples_ok": g.samples_ok,
        "why_not_running": why,
        "seconds_since_inference": gate.seconds_since_request(),
        "request_rate_per_s": gate.request_rate(),
        "auto_cycles": settings.auto_cycles,
        "consecutive_failures": failures,
        "next_automatic_cycle_not_before": not_before,
    }


def telemetry_section(view: SchedulerView, settings: Settings, gate: Gate, provider_name: str) -> dict:
    return {"provider": provider_name, **view.reading.to_dict(), "limits": {
        "thermal_limit_c": settings.thermal_limit_c, "power_budget_w": gate.power_budget(view.reading),
        "max_cpu_load": settings.max_cpu_load, "max_gpu_load": settings.max_gpu_load}}


def label_shift_section(model: Served | None, generalist: GeneralistWatch | None, prior: PriorAdapter | None = None) -> dict | None:
    """The device's class-prior estimate and whether the served model's answers are corrected to it, and the
    generalist watch's estimate."""
    if model is None:
        return None
    section = (prior or model.prior).view(model.assumes).to_dict()
    estimate = generalist.watch.estimate() if generalist is not None and generalist.watch is not None else None
    section["generalist"] = None if generalist is None else {
        "version": generalist.version, "watching": model.version != generalist.version,
        "estimate": None if estimate is None else dict(zip(model.card.class_names, estimate)),
    }
    return section


def status_document(*, model: Served | None, buffer_stats: dict, view: SchedulerView, settings: Settings,
                    gate: Gate, provider_name: str, now: float, generalist: GeneralistWatch | None = None,
                    rebuild: dict | None = None, prior: PriorAdapter | None = None) -> dict:
    return {
        "label_shift": label_shift_section(model, generalist, prior),
        "model": model_section(model, rebuild),
        "buffer": buffer_section(buffer_stats, model.card.class_names if model else []),
        "scheduler": scheduler_section(view, settings, gate, now),
        "telemetry": telemetry_section(view, settings, gate, provider_name),
        "cycle": view.current.to_dict() if view.current is not None else None,
    }
