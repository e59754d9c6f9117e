"""Prometheus metrics, every name prefixed `edgetune_`, in a registry of the app's own."""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..cycles.cycle_state import CycleState

if TYPE_CHECKING:
    from ..cycles.gate import GateState
    from .telemetry import Reading

disable_created_metrics()  # the *_created series only add noise to dashboards

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CYCLE_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgetune_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.request_latency = Histogram(
            "edgetune_request_latency_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_latency = Histogram(
            "edgetune_inference_latency_seconds", "Model forward time per image", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_batch = Histogram(
            "edgetune_inference_batch_size", "Images per forward pass (dynamic batching)", buckets=BATCH_BUCKETS, registry=r
        )
        self.samples_ingested = Counter("edgetune_samples_ingested", "Samples written to the buffer", ["source"], registry=r)
        self.samples_dropped = Counter(
            "edgetune_samples_dropped", "Unlabelled /infer samples not buffered although their request was answered:"
            " queue_full (sample_queue_size reached) or storage_error (the group commit failed)", ["reason"], registry=r)
        self.buffer_samples = Gauge("edgetune_buffer_samples", "Samples in the buffer", registry=r)
        self.buffer_labelled = Gauge("edgetune_buffer_labelled_samples", "Labelled samples in the buffer", registry=r)
        self.buffer_bytes = Gauge("edgetune_buffer_bytes", "Image bytes in the buffer", registry=r)
        self.buffer_max_bytes = Gauge("edgetune_buffer_max_bytes", "Configured buffer size limit", registry=r)
        self.buffer_max_samples = Gauge("edgetune_buffer_max_samples", "Configured buffer row limit", registry=r)
        self.cycles = Counter("edgetune_cycles", "Finished prune-retrain cycles by outcome", ["outcome"], registry=r)
        self.cycle_duration = Histogram("edgetune_cycle_duration_seconds", "Cycle wall time", buckets=CYCLE_BUCKETS, registry=r)
        self.cycle_running = Gauge("edgetune_cycle_running", "1 while a cycle runs (2 while paused)", registry=r)
        self.swaps = Counter("edgetune_swaps", "Model hot-swaps (accepted cycles and activations)", registry=r)
        self.model_info = Gauge("edgetune_model_info", "Active model (value 1)", ["version", "arch"], registry=r)
        self.model_params = Gauge("edgetune_model_params", "Parameters of the active model", registry=r)
        self.model_macs = Gauge("edgetune_model_macs", "MACs per image of the active model", registry=r)
        self.serving_backend = Gauge("edgetune_serving_backend_info", "Backend serving the active model (value 1)", ["backend", "engine"], registry=r)
        self.serving_latency = Gauge("edgetune_serving_latency_seconds", "Median batch-1 forward of the serving engine, measured when it was loaded", registry=r)
        self.engine_builds = Counter("edgetune_engine_builds", "Engines built in the background by backend and outcome (built, failed)", ["backend", "outcome"], registry=r)
        self.temperature = Gauge("edgetune_temperature_celsius", "Temperature by zone", ["zone"], registry=r)
        self.temperature_max = Gauge("edgetune_temperature_max_celsius", "Hottest zone", registry=r)
        self.thermal_limit = Gauge("edgetune_thermal_limit_celsius", "Configured thermal limit", registry=r)
        self.power = Gauge("edgetune_power_watts", "Board power", registry=r)
        self.power_budget = Gauge("edgetune_power_budget_watts", "Configured power budget (NaN: none)", registry=r)
        self.load = Gauge("edgetune_load_percent", "Load by unit", ["unit"], registry=r)
        self.gate_open = Gauge("edgetune_gate_open", "1 when a cycle may start", registry=r)
        self.generalist_fallbacks = Counter("edgetune_generalist_fallbacks", "Swaps back to the generalist because a class the served model was not trained for appeared", registry=r)
        self.class_prior = Gauge("edgetune_class_prior", "Class prior: what the served model assumes (source) and the traffic's estimate (em, bbse)", ["class", "estimator"], registry=r)
        self.prior_correction = Gauge("edgetune_prior_correction_applied", "1 while answers are corrected to the estimated class prior", registry=r)
        self.prior_changes = Gauge("edgetune_prior_scene_changes", "Scene changes the class-prior change detector found since start", registry=r)
        self.prior_scene = Gauge("edgetune_prior_scene_samples", "Answers of the current scene the class prior is estimated over", registry=r)
        self.prior_gain = Gauge("edgetune_prior_expected_gain", "Top-1 correcting to the estimated prior is expected to gain (NaN: no estimate)", registry=r)
        self.spot_checks = Gauge("edgetune_prior_spot_check", "Labelled requests of the current scene, and how many the uncorrected / corrected answer got right (both, whichever was served)", ["count"], registry=r)
        self.gate_condition = Gauge("edgetune_gate_condition", "Gate conditions (1 = satisfied)", ["condition"], registry=r)

    def set_model(self, version: str, arch: str, params: int, macs: int) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version, arch=arch).set(1)
        self.model_params.set(params)
        self.model_macs.set(macs)

    def set_backend(self, backend: str, engine: str, latency_ms: float) -> None:
        self.serving_backend.clear()
        self.serving_backend.labels(backend=backend, engine=engine).set(1)
        self.serving_latency.set(latency_ms / 1e3)

    def observe_poll(self, reading: Reading, gate: GateState, buffer: dict, thermal_limit_c: float,
                     power_budget_w: float | None, cycle_state: CycleState | None) -> None:
        """One scheduler poll: telemetry, the gate, the buffer and whether a cycle runs."""
        nan = float("nan")
        for zone, temp in reading.temperatures_c.items():
            self.temperature.labels(zone=zone).set(temp)
        self.temperature_max.set(reading.max_temperature_c if reading.max_temperature_c is not None else nan)
        self.thermal_limit.set(thermal_limit_c)
        self.power.set(reading.power_w if reading.power_w is not None else nan)
        self.power_budget.set(power_budget_w if power_budget_w is not None else nan)
        for unit, value in (("cpu", reading.cpu_load), ("gpu", reading.gpu_load), ("memory", reading.memory_used)):
            if value is not None:
                self.load.labels(unit=unit).set(value)
        self.gate_open.set(1 if gate.open else 0)
        for cond in ("idle", "load_ok", "thermal_ok", "power_ok", "samples_ok"):
            self.gate_condition.labels(condition=cond).set(1 if getattr(gate, cond) else 0)
        self.buffer_samples.set(buffer["samples"])
        self.buffer_labelled.set(buffer["labelled"])
        self.buffer_bytes.set(buffer["bytes"])
        self.buffer_max_bytes.set(buffer["max_bytes"])
        self.buffer_max_samples.set(buffer["max_rows"])
        self.cycle_running.set({CycleState.RUNNING: 1, CycleState.PAUSED: 2}.get(cycle_state, 0))

    def observe_prior(self, view) -> None:
        """The device's label-shift state (a prior_adapter.PriorView)."""
        self.class_prior.clear()
        for estimator, values in (("source", view.source_prior), ("em", view.estimate), ("bbse", view.bbse)):
            for name, share in zip(view.classes, values or []):
                self.class_prior.labels(**{"class": name, "estimator": estimator}).set(share)
        self.prior_correction.set(1 if view.applied else 0)
        self.prior_changes.set(view.changes)
        self.prior_scene.set(view.samples)
        self.prior_gain.set(view.expected_gain if view.expected_gain is not None else float("nan"))
        spots = view.spot_check
        for count, value in (("labelled", spots.labelled), ("correct_raw", spots.correct_raw), ("correct_corrected", spots.correct_corrected)):
            self.spot_checks.labels(count=count).set(value)

    def cycle_finished(self, outcome: str, seconds: float | None) -> None:
        self.cycles.labels(outcome=outcome).inc()
        if seconds is not None:
            self.cycle_duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
