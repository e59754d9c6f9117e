"""Daemon settings: defaults < config.toml < EDGETUNE_* environment < command line.

The TOML file is `<state dir>/config.toml` when present, else `/etc/edgetune/config.toml`.
Every field has an environment name: `EDGETUNE_` + the field name in upper case.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from prune_core import options

DEFAULT_STATE_DIR = Path("/var/lib/edgetune")
SYSTEM_CONFIG = Path("/etc/edgetune/config.toml")


class ConfigError(ValueError):
    """Invalid configuration; the message names the field."""


class Settings(BaseSettings):
    """Everything the daemon can be told. Units are in the names."""

    model_config = SettingsConfigDict(env_prefix="EDGETUNE_", extra="forbid", validate_default=True)

    # Where and how to serve
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="buffer.sqlite, models/ and cycles/ live here (the systemd unit passes --state-dir, which wins)")
    host: str = Field("127.0.0.1", description="bind address; anything but loopback requires api_token")
    port: int = Field(8000, ge=0, le=65535, description="API port")
    api_token: SecretStr | None = Field(
        None, description="when set, every POST (and GET /prune) must send it as a bearer token (Authorization header); binding a non-loopback host requires it")
    device: str | None = Field(None, description="cpu or cuda; default: cuda when available")
    max_upload_bytes: int = Field(10 * 2**20, gt=0, description="largest accepted image upload (413 above)")
    serving_backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = Field(
        "auto", description="what runs the model: auto (the fastest installed engine verified against torch), torch,"
        " onnxruntime or tensorrt; engines are built before a swap, and torch serves while one is missing or stale")
    serving_threads: int | None = Field(
        None, ge=1, description="onnxruntime intra-op threads per served engine; unset = one per physical core")

    # Telemetry and the gate
    telemetry: Literal["auto", "jtop", "sysfs", "simulated"] = Field(
        "auto", description="where temperatures, power and load come from; auto: jtop, then sysfs, then simulated")
    simulated_telemetry: Path | None = Field(None, description="JSON file re-read at every poll by the simulated provider")
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="how often telemetry is read and the gate evaluated")
    idle_seconds: float = Field(30.0, ge=0, description="no inference for this long counts as idle")
    max_request_rate: float = Field(0.0, ge=0, description="requests/s (last minute) still counted as idle")
    max_cpu_load: float = Field(85.0, ge=0, le=100, description="percent")
    max_gpu_load: float = Field(50.0, ge=0, le=100, description="percent")
    thermal_limit_c: float = Field(75.0, description="the hottest thermal zone must stay below this")
    thermal_hysteresis_c: float = Field(5.0, ge=0, description="after a thermal trip, cycles resume only below thermal_limit_c minus this")
    power_budget_w: float | None = Field(None, gt=0, description="total board power limit; none = unlimited")
    power_budget_by_mode: dict[str, float] = Field(
        default_factory=dict, description="power budget per nvpmodel mode name (as /status shows it under telemetry.power_mode); beats power_budget_w")
    min_samples: int = Field(200, ge=1, description="samples buffered before a cycle may start")
    min_per_class: int = Field(0, ge=0, description="every class seen must have this many samples")

    # Periodic cycles
    auto_cycles: bool = Field(True, description="start cycles on its own when the gate opens")
    new_samples_per_cycle: int = Field(500, ge=1, description="new samples since the last cycle before a periodic one")

    # The request path: dynamic batching and the queue of samples behind the answers
    max_batch: int = Field(
        16, ge=1, le=1024, description="concurrent /infer requests run through the model together, at most this many per forward pass; 1: no batching")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="how long a request may wait for others to join its batch; 0: only those already waiting join (a lone request never waits)")
    sample_queue_size: int = Field(
        1024, ge=1, description="unlabelled /infer samples waiting for the buffer's group commit; beyond it a sample is dropped"
        " (counted in edgetune_samples_dropped_total), never the request")

    # Sample buffer
    buffer_max_rows: int = Field(20_000, ge=10, description="samples kept; the most represented class is evicted first")
    buffer_max_bytes: int = Field(512 * 2**20, ge=2**16, description="bytes of image data kept")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of samples held out to validate candidates")

    # The cycle
    cycle_level: Union[Literal["auto"], float] = Field(
        "auto", description="fraction of parameters to remove, or auto (with labels, search for the most pruned model within"
        " cycle_tolerance; without, walk cycle_prune_steps up to 75 % while the acceptance rule holds on the choosing samples)")
    cycle_criterion: str = Field(
        "activation", description="activation, apoz, l1, random or taylor, or several comma-separated (each tried, the best on held-out kept)")
    cycle_allocation: str = Field(
        "uniform", description="uniform (same share of channels per layer), global (by score per parameter), or uniform,global"
        " (both tried, the better on held-out kept; twice the retraining)")
    cycle_epochs: int = Field(3, ge=0, description="retraining epochs after pruning")
    cycle_finetune_before: int = Field(1, ge=0, description="epochs of fine-tuning on the device's data before ranking (ADaPT)")
    cycle_tolerance: float = Field(0.02, ge=0, le=1, description="accuracy the automatic level search may give up")
    cycle_batch_size: int = Field(64, ge=2, description="training batch size")
    cycle_retrain_scope: options.RetrainScope = Field(
        options.RetrainScope.FULL, description="which parameters retraining updates: full (all), last (the last stages;"
        " no graph kept for the frozen front), last_bn (the last stages and every normalisation layer), bias (biases,"
        " normalisation layers and the classifier, as TinyTL); the cheaper scopes save memory and time (docs/architecture.md)")
    cycle_judge_share: float = Field(
        options.DEFAULT_JUDGE_SHARE, ge=0, lt=1, description="share of the held-out samples a cycle keeps apart from its choices (early stopping, the"
        " level search, the criterion) and judges its candidate on alone; 0 judges on the samples that chose, which"
        " flatters the candidate (bench/RESULTS.md)")
    cycle_retrain_last_share: float = Field(
        options.DEFAULT_LAST_SHARE, gt=0, le=1, description="share of the weight layers, at the end, that the last and last_bn"
        " scopes retrain; a smaller share saves more memory and time and costs more accuracy (bench/RESULTS.md)")
    cycle_recipe: options.Recipe = Field(
        options.Recipe.PATIENT, description="patient: the teacher and student see the same cropped, flipped and mixed view, AdamW"
        " with warm-up and cosine decay, MSE on logits, no early stopping (bench/RESULTS.md); classic: SGD one-cycle with"
        " early stopping, the teacher on the student's unmixed view")
    cycle_distil_budget_s: float = Field(
        300.0, ge=0, description="seconds of training (pauses not counted, so it may span several idle windows) a cycle's"
        " retraining gets in the patient recipe, shared by its prune steps; 0 = cycle_epochs (and cycle_min_steps) per step")
    cycle_prune_steps: int = Field(
        options.DEFAULT_PRUNE_STEPS, ge=1, description="prune gradually in this many steps, distilling between them (the"
        " budget shared equally); without labels, level auto walks them up to 75 % of the parameters and keeps the last"
        " step the acceptance rule finds close enough to the teacher on the choosing samples")
    cycle_recent_half_life: float = Field(
        4096.0, ge=0, description="a cycle trains on the whole buffer, recent traffic weighing more: a sample's weight halves"
        " every this many samples back from the newest (0: every buffered sample alike)")
    cycle_checkpoint_s: float = Field(
        30.0, gt=0, description="a cycle's training writes a resumable checkpoint in the state dir at most this often, so a"
        " daemon restart resumes the same cycle instead of starting over")
    cycle_hflip: bool = Field(True, description="horizontal-flip augmentation while retraining; off for digits, text, anything a mirror changes")
    cycle_min_steps: int = Field(150, ge=0, description="at least this many SGD steps per retraining (small buffers)")
    cycle_timeout_s: float = Field(3600.0, gt=0, description="a cycle running (not paused) longer than this is killed and marked failed")
    cycle_memory_limit_mb: int | None = Field(
        None, ge=64, description="address-space limit of the cycle worker in MiB (RLIMIT_AS); over it the cycle fails as out of memory."
        " Unset = unlimited. CPU only: CUDA reserves far more address space than it uses, so on a GPU use the unit's MemoryMax")
    cycle_memory_budget_mb: int | None = Field(
        None, ge=64, description="the cycle's predicted peak memory in MiB must fit this: before its heavy work the worker profiles a"
        " few training steps and picks the largest batch size up to cycle_batch_size that fits; when none does the cycle is"
        " refused (failed, with the figures). Unset = no budget (the prediction is still made and recorded)")
    cycle_backoff_base_s: float = Field(60.0, ge=0, description="after a failed cycle, wait this long before an automatic one; doubles per failure in a row")
    cycle_backoff_max_s: float = Field(3600.0, ge=0, description="the longest wait between automatic cycles after repeated failures")
    pause_timeout_s: float = Field(900.0, gt=0, description="a cycle paused longer than this is aborted")
    worker_nice: int = Field(10, ge=0, le=19, description="extra niceness of the cycle worker, on top of the service's Nice=")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="a candidate may lose at most this much held-out top-1")
    min_size_gain: float = Field(0.05, ge=0, lt=1, description="a candidate must also have at least this fraction fewer parameters")
    keep_versions: int = Field(5, ge=1, description="model versions kept on disk; the first one (the generalist) is always among them")
    min_agreement: float = Field(
        0.99, ge=0, le=1, description="with no labelled held-out samples, a candidate must agree with the prior-corrected"
        " served model on at least this share of them (disagreement bounds the accuracy it can lose against it), or lose"
        " at most max_accuracy_drop as that model's calibrated probabilities expect, at 95 % (daemon/cycles/acceptance.py)")
    min_label_evidence: int = Field(
        200, ge=0, description="with fewer labelled held-out samples than this (and under half of them labelled) and a prior-corrected"
        " teacher, a candidate must pass the agreement test as well as the labels: a few dozen labels cannot tell a point of top-1 apart")
    acceptance_confidence: float = Field(
        0.95, gt=0.5, lt=1, description="confidence of the paired evidence a candidate is accepted on without enough labels: the"
        " disagreement rate's exact bound, the calibrated teacher's expected loss and the labels of disagreements share its"
        " error (daemon/cycles/acceptance.py)")
    disagreement_labels: int = Field(
        100, ge=0, le=1000, description="where the label-free evidence cannot decide, a candidate is kept pending and asks for the"
        " labels of at most this many of the judging samples it and the served model answer differently (GET"
        " /cycles/{id}/disagreements, the status page); 0: reject it instead")
    pending_timeout_s: float = Field(
        86400.0, gt=0, description="a pending candidate whose labels have not decided within this long is rejected; no other"
        " cycle starts meanwhile")

    # Unlabelled traffic: label shift and the generalist
    prior_adaptation: bool = Field(True, description="serve answers corrected to the class prior estimated from traffic (no training, no labels)")
    prior_floor: float = Field(1e-3, ge=0, lt=0.01, description="the smallest prior share a class is given, so none is ever driven to zero")
    prior_gate: float = Field(0.2, ge=0, le=1, description="correct only once the estimate is this far (total variation) from the model's own prior: without a shift EM's noise only costs")
    prior_window: int = Field(1024, ge=10, description="at most this many answers of the current scene the class prior is estimated over")
    prior_min_samples: int = Field(24, ge=1, description="answers of a scene (since the last detected change) before it has an estimate")
    prior_min_gain: float = Field(0.01, ge=0, le=1, description="correct only where correcting is expected to gain at least this top-1 (under the estimate)")
    prior_change_z: float = Field(4.5, gt=0, le=10, description="the scene-change detector's false-alarm level on predicted-class shares (a normal quantile: higher, fewer and later detections)")
    generalist_fallback: bool = Field(True, description="run the first model (the generalist) on a sample of traffic and serve it again when a class the specialised model was not trained for appears")
    drift_sample_every: int = Field(4, ge=1, description="the generalist looks at every Nth answered image")
    drift_appear_share: float = Field(0.1, gt=0, lt=1, description="a class this frequent in the generalist's estimate ...")
    drift_trained_share: float = Field(0.02, gt=0, lt=1, description="... that the served model's prior gave less than this triggers the fallback")

    # The cycle options are checked by prune_core.options, the one validator of cycle options everywhere;
    # its ValueError names the problem.
    @field_validator("cycle_level")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return options.parse_level(v)

    @field_validator("cycle_criterion", "cycle_allocation")
    @classmethod
    def _option_list(cls, v: str, info: ValidationInfo) -> str:
        parse = options.parse_criteria if info.field_name == "cycle_criterion" else options.parse_allocations
        parse(v)
        return v

    @property
    def buffer_path(self) -> Path:
        return self.state_dir / "buffer.sqlite"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def cycles_dir(self) -> Path:
        return self.state_dir / "cycles"

    @property
    def checkpoints_dir(self) -> Path:
        """Resumable training checkpoints of running cycles, one directory per cycle id."""
        return self.state_dir / "cycle-checkpoints"


def config_file_for(state_dir: Path) -> Path | None:
    for candidate in (state_dir / "config.toml", SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_settings(**overrides: Any) -> Settings:
    """Settings for a state dir (from overrides, EDGETUNE_STATE_DIR or the default), raising
    ConfigError with the offending field's name on any invalid value."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    state_dir = Path(overrides.get("state_dir") or os.environ.get("EDGETUNE_STATE_DIR") or DEFAULT_STATE_DIR)
    toml_file = config_file_for(state_dir)

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if toml_file is not None:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=toml_file),)
            return sources

    where = f" (from {toml_file} and EDGETUNE_* environment)" if toml_file else " (from EDGETUNE_* environment)"
    try:
        settings = FileSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration{where}: {problems}") from None
    except (ValueError, OSError) as exc:  # e.g. malformed TOML
        raise ConfigError(f"invalid configuration{where}: {exc}") from None
    return settings
