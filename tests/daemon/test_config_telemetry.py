"""Settings from config.toml and EDGETUNE_* variables; telemetry providers on real (fake-root) sysfs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from daemon.ops.config import ConfigError, load_settings
from daemon.cycles.gate import Gate
from daemon.ops.telemetry import Reading, SimulatedProvider, SysfsProvider, make_provider


def test_toml_then_env_then_arguments(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text("idle_seconds = 12\nthermal_limit_c = 66.5\nport = 9001\n")
    s = load_settings(state_dir=tmp_path)
    assert (s.idle_seconds, s.thermal_limit_c, s.port) == (12, 66.5, 9001)
    monkeypatch.setenv("EDGETUNE_THERMAL_LIMIT_C", "60")
    s = load_settings(state_dir=tmp_path, port=9100)
    assert (s.idle_seconds, s.thermal_limit_c, s.port) == (12, 60, 9100)
    monkeypatch.setenv("EDGETUNE_CYCLE_RETRAIN_SCOPE", "last_bn")
    assert load_settings(state_dir=tmp_path).cycle_retrain_scope.value == "last_bn"


@pytest.mark.parametrize(
    "toml,env,field",
    [
        ("thermal_limit_c = 'hot'\n", {}, "thermal_limit_c"),
        ("no_such_key = 1\n", {}, "no_such_key"),
        ("", {"EDGETUNE_CYCLE_LEVEL": "1.5"}, "cycle_level"),
        ("", {"EDGETUNE_CYCLE_CRITERION": "magic"}, "cycle_criterion"),
        ("cycle_allocation = 'global,global'\n", {}, "cycle_allocation"),
        ("", {"EDGETUNE_MIN_SAMPLES": "0"}, "min_samples"),
        ("cycle_retrain_scope = 'everything'\n", {}, "cycle_retrain_scope"),
        ("", {"EDGETUNE_CYCLE_RETRAIN_LAST_SHARE": "0"}, "cycle_retrain_last_share"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, monkeypatch, toml, env, field):
    (tmp_path / "config.toml").write_text(toml)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=field):
        load_settings(state_dir=tmp_path)


def test_malformed_toml(tmp_path):
    (tmp_path / "config.toml").write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="invalid configuration"):
        load_settings(state_dir=tmp_path)


@pytest.mark.slow
def test_serve_refuses_bad_config_in_one_line(tmp_path, base_model_dir):
    exe = shutil.which("edgetune", path=os.path.dirname(sys.executable))
    env = {**os.environ, "EDGETUNE_POWER_BUDGET_W": "-3"}
    r = subprocess.run([exe, "serve", "--state-dir", str(tmp_path), "--model", str(base_model_dir)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "power_budget_w" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([exe, "serve", "--state-dir", str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--model" in r.stderr
    r = subprocess.run([exe, "serve", "--state-dir", str(tmp_path / "x"), "--model", str(base_model_dir), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "api_token" in r.stderr


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_sysfs_provider_reads_thermal_power_gpu(tmp_path):
    root = tmp_path
    _write(root / "sys/class/thermal/thermal_zone0/temp", "45500\n")
    _write(root / "sys/class/thermal/thermal_zone0/type", "CPU-therm\n")
    _write(root / "sys/class/thermal/thermal_zone1/temp", "-256000\n")  # a disabled zone
    _write(root / "sys/class/thermal/thermal_zone2/temp", "51000\n")
    _write(root / "sys/class/thermal/thermal_zone2/type", "GPU-therm\n")
    hw = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    _write(hw / "in1_input", "5000\n")
    _write(hw / "curr1_input", "1200\n")
    _write(hw / "in2_input", "5000\n")
    _write(hw / "curr2_input", "400\n")
    _write(root / "sys/devices/gpu.0/load", "350\n")
    reading = SysfsProvider(str(root)).read()
    assert reading.temperatures_c == {"CPU-therm": 45.5, "GPU-therm": 51.0}
    assert reading.max_temperature_c == 51.0
    assert reading.power_w == pytest.approx(8.0)
    assert reading.gpu_load == pytest.approx(35.0)
    assert reading.cpu_load is not None


def test_simulated_provider_rereads_its_file(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"temperature_c": 40, "power_w": 3}))
    p = SimulatedProvider(f)
    assert p.read().max_temperature_c == 40
    f.write_text(json.dumps({"temperature_c": 90, "power_w": 12, "gpu_load": 70}))
    r = p.read()
    assert (r.max_temperature_c, r.power_w, r.gpu_load) == (90, 12, 70)
    f.write_text("{broken")
    assert p.read().max_temperature_c is None  # unreadable: no values, no crash


def test_provider_selection(monkeypatch, tmp_path):
    assert make_provider("simulated", tmp_path / "x.json").name == "simulated"
    assert make_provider("sysfs").name == "sysfs"
    assert make_provider("auto").name in ("sysfs", "simulated")  # no jtop service here
    with pytest.raises(RuntimeError, match="jtop"):
        make_provider("jtop")


def test_gate_conditions_and_hysteresis(tmp_path):
    s = load_settings(state_dir=tmp_path, idle_seconds=0.2, thermal_limit_c=70, thermal_hysteresis_c=5, power_budget_w=10,
                      min_samples=5, min_per_class=2, power_budget_by_mode={"MAXN": 20})
    g = Gate(s)
    ok = g.evaluate(Reading({"z": 50}, power_w=5, cpu_load=10, gpu_load=0), 10, {0: 5, 1: 5})
    assert ok.open and not ok.reasons
    assert not g.evaluate(Reading({"z": 71}), 10, {0: 10}).thermal_ok
    assert not g.evaluate(Reading({"z": 68}), 10, {0: 10}).thermal_ok  # hysteresis
    assert g.evaluate(Reading({"z": 64}), 10, {0: 10}).thermal_ok
    over = g.evaluate(Reading({"z": 50}, power_w=15), 10, {0: 10})
    assert not over.power_ok and not over.hard_ok and "power" in over.reasons[0]
    assert g.evaluate(Reading({"z": 50}, power_w=15, power_mode="MAXN"), 10, {0: 10}).power_ok  # per-mode budget
    few = g.evaluate(Reading(), 3, {0: 3})
    assert not few.samples_ok and few.hard_ok and not few.open
    assert not g.evaluate(Reading(), 10, {0: 9, 1: 1}).samples_ok  # min_per_class
    g.note_request()
    busy = g.evaluate(Reading(), 10, {0: 10})
    assert not busy.idle and not busy.may_continue and busy.hard_ok
    time.sleep(0.25)
    assert g.evaluate(Reading(), 10, {0: 10}).idle
