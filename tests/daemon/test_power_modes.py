"""Jetson power modes end to end: the provider reports the nvpmodel mode and jetson_clocks, /status
shows them, and the gate applies that mode's power budget."""
from __future__ import annotations

import json
import re
import signal
import time

import pytest

from daemon.ops.telemetry import SysfsProvider, jtop_power_state


def _wait_status(d, predicate, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = d.client.get("/status").json()
        if predicate(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


@pytest.mark.slow
def test_power_mode_budget_through_the_daemon(make_daemon):
    # also: a watchdog variable without a notify socket must be harmless, and logs stay plain
    d = make_daemon(env={
        "EDGETUNE_POWER_BUDGET_W": "10",
        "EDGETUNE_POWER_BUDGET_BY_MODE": json.dumps({"MAXN": 25, "15W": 12}),
        "WATCHDOG_USEC": "1000000",
    })
    d.env.pop("NOTIFY_SOCKET", None)
    d.env.pop("JOURNAL_STREAM", None)
    d.set_telemetry(temperature_c=45.0, power_w=14.0, power_mode="15W", jetson_clocks=True)
    d.start()

    s = _wait_status(d, lambda s: s["telemetry"]["power_mode"] == "15W")
    assert (s["telemetry"]["power_mode"], s["telemetry"]["jetson_clocks"]) == ("15W", True)
    assert s["scheduler"]["power_budget_w"] == 12 and s["scheduler"]["power_ok"] is False
    assert any("over power budget: 14.0 W > 12 W" in r for r in s["scheduler"]["why_not_running"])

    d.set_telemetry(temperature_c=45.0, power_w=14.0, power_mode="MAXN", jetson_clocks=False)
    s = _wait_status(d, lambda s: s["telemetry"]["power_mode"] == "MAXN")
    assert s["telemetry"]["jetson_clocks"] is False
    assert s["scheduler"]["power_budget_w"] == 25 and s["scheduler"]["power_ok"] is True

    d.set_telemetry(temperature_c=45.0, power_w=14.0)  # a mode without its own budget: the global one
    s = _wait_status(d, lambda s: s["telemetry"]["power_mode"] is None)
    assert s["scheduler"]["power_budget_w"] == 10 and s["scheduler"]["power_ok"] is False
    metrics = d.client.get("/metrics").text
    assert re.search(r"^edgetune_power_budget_watts 10\.0$", metrics, re.M), [l for l in metrics.splitlines() if "budget" in l]

    d.stop(signal.SIGTERM)
    log = d.log.read_text()
    assert "sd_notify" not in log and "Traceback" not in log
    assert re.search(r"^\d{4}-\d\d-\d\d .* INFO uvicorn.error: ", log, re.M), log[-2000:]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_sysfs_provider_reads_the_nvpmodel_mode(tmp_path):
    p = SysfsProvider(str(tmp_path))
    assert p.read().power_mode is None  # not a Jetson
    _write(tmp_path / "etc/nvpmodel.conf", "< PM_CONFIG DEFAULT=2 >\n< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n"
                                           "< POWER_MODEL ID=1 NAME=MODE_10W >\n< POWER_MODEL ID=2 NAME=MODE_15W >\n")
    _write(tmp_path / "var/lib/nvpmodel/status", "pmode:0002 fmode:quiet\n")
    assert p.read().power_mode == "MODE_15W"
    _write(tmp_path / "var/lib/nvpmodel/status", "pmode:0000\n")
    assert p.power_mode() == "MAXN"
    _write(tmp_path / "var/lib/nvpmodel/status", "pmode:0007\n")
    assert p.power_mode() == "7"  # unnamed in the conf: the id
    assert p.read().jetson_clocks is None  # only jtop knows


class _Clocks:
    def __init__(self, on: bool):
        self.on, self.status = on, "inactive"

    def __bool__(self) -> bool:
        return self.on


class _Nvp:
    name = "MAXN"


class _Jetson:
    """The two jtop attributes jtop_power_state reads, as jetson-stats 4 exposes them."""

    def __init__(self, clocks, nvp):
        self._clocks, self._nvp = clocks, nvp

    @property
    def jetson_clocks(self):
        return self._clocks

    @property
    def nvpmodel(self):
        if self._nvp is None:
            raise RuntimeError("nvpmodel not available on this board")
        return self._nvp


def test_jtop_power_state():
    assert jtop_power_state(_Jetson(_Clocks(False), _Nvp())) == ("MAXN", False)  # status 'inactive' is not "on"
    assert jtop_power_state(_Jetson(_Clocks(True), _Nvp())) == ("MAXN", True)
    assert jtop_power_state(_Jetson(None, None)) == (None, None)
