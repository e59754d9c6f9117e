"""Telemetry providers: temperatures, power, load and the Jetson power mode. `jtop` (jetson-stats
service), `sysfs` (thermal zones, INA3221 rails, nvpmodel's status file, psutil) and `simulated`
(a JSON file re-read at every poll). Auto-detection tries them in that order."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("edgetune.telemetry")
JTOP_SOCKET = Path("/run/jtop.sock")
NVPMODEL_STATUS = "/var/lib/nvpmodel/status"  # "pmode:0002 fmode:…": the current mode's id
NVPMODEL_CONF = "/etc/nvpmodel.conf"  # "< POWER_MODEL ID=2 NAME=15W >" lines name the ids


@dataclass
class Reading:
    """One poll. Missing values are None (the gate then does not use them)."""

    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_w: float | None = None
    gpu_load: float | None = None  # percent
    cpu_load: float | None = None  # percent
    memory_used: float | None = None  # percent
    power_mode: str | None = None  # nvpmodel mode name, where known
    jetson_clocks: bool | None = None

    @property
    def max_temperature_c(self) -> float | None:
        return max(self.temperatures_c.values()) if self.temperatures_c else None

    def to_dict(self) -> dict:
        return {**asdict(self), "max_temperature_c": self.max_temperature_c}


class Provider(ABC):
    name: str

    @abstractmethod
    def read(self) -> Reading: ...

    def close(self) -> None:
        pass


class SimulatedProvider(Provider):
    """Values from a JSON file (keys temperature_c, power_w, gpu_load, cpu_load, memory_used,
    power_mode, jetson_clocks), re-read at every poll so tests and demos can drive the gate from
    outside the process."""

    name = "simulated"

    def __init__(self, path: Path | None):
        self.path = path

    def read(self) -> Reading:
        data = {}
        if self.path is not None:
            try:
                data = json.loads(Path(self.path).read_text())
            except (OSError, ValueError) as exc:
                log.warning("simulated telemetry file %s unreadable: %s", self.path, exc)
        temp = data.get("temperature_c")
        return Reading(
            temperatures_c={"simulated": float(temp)} if temp is not None else {},
            power_w=_num(data.get("power_w")),
            gpu_load=_num(data.get("gpu_load")),
            cpu_load=_num(data.get("cpu_load")),
            memory_used=_num(data.get("memory_used")),
            power_mode=str(data["power_mode"]) if data.get("power_mode") is not None else None,
            jetson_clocks=bool(data["jetson_clocks"]) if data.get("jetson_clocks") is not None else None,
        )


def _num(v) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _read_number(path: str) -> float | None:
    try:
        return float(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


class SysfsProvider(Provider):
    """Linux sysfs: /sys/class/thermal zones, INA3221 power rails (Jetson), GPU load node, psutil,
    and the nvpmodel mode from nvpmodel's own status file (no jetson_clocks state: only jtop knows it)."""

    name = "sysfs"

    def __init__(self, root: str = "/"):
        self.root = root
        self._mode_names: dict[int, str] | None = None  # nvpmodel.conf does not change while we run
        psutil.cpu_percent(None)  # prime the counter

    def _glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(self.root, pattern.lstrip("/"))))

    def temperatures(self) -> dict[str, float]:
        temps = {}
        for zone in self._glob("/sys/class/thermal/thermal_zone*"):
            milli = _read_number(os.path.join(zone, "temp"))
            if milli is None or milli <= -40_000:  # disabled zones report huge negatives
                continue
            try:
                name = Path(zone, "type").read_text().strip()
            except OSError:
                name = Path(zone).name
            temps[name] = milli / 1000.0
        return temps

    def power(self) -> float | None:
        """Sum of INA3221 rails: hwmon in*_input (mV) × curr*_input (mA), or iio in_power*_input (mW)."""
        total, found = 0.0, False
        for dev in self._glob("/sys/bus/i2c/drivers/ina3221*/*"):
            for hw in glob.glob(os.path.join(dev, "hwmon", "hwmon*")):
                for volt in sorted(glob.glob(os.path.join(hw, "in[1-3]_input"))):
                    ch = os.path.basename(volt)[2]
                    mv, ma = _read_number(volt), _read_number(os.path.join(hw, f"curr{ch}_input"))
                    if mv is not None and ma is not None:
                        total += mv * ma / 1e6
                        found = True
            for mw_path in glob.glob(os.path.join(dev, "iio:device*", "in_power*_input")):
                mw = _read_number(mw_path)
                if mw is not None:
                    total += mw / 1000.0
                    found = True
        return total if found else None

    def gpu_load(self) -> float | None:
        for node in self._glob("/sys/devices/gpu.0/load") + self._glob("/sys/devices/platform/*gpu*/load") + self._glob("/sys/devices/platform/bus@0/*gpu*/load"):
            value = _read_number(node)
            if value is not None:
                return value / 10.0  # per-mille
        return None

    def power_mode(self) -> str | None:
        """The current nvpmodel mode's name (its id where the conf does not name it); None off a Jetson."""
        try:
            status = Path(self.root, NVPMODEL_STATUS.lstrip("/")).read_text()
        except OSError:
            return None
        match = re.search(r"pmode:\s*(\d+)", status)
        if match is None:
            return None
        if self._mode_names is None:
            try:
                conf = Path(self.root, NVPMODEL_CONF.lstrip("/")).read_text(errors="replace")
            except OSError:
                conf = ""
            self._mode_names = {
                int(m["id"]): m["name"] for m in re.finditer(r"<\s*POWER_MODEL\s+ID=(?P<id>\d+)\s+NAME=(?P<name>[^\s>]+)", conf)
            }
        mode = int(match[1])
        return self._mode_names.get(mode, str(mode))

    def read(self) -> Reading:
        return Reading(
            temperatures_c=self.temperatures(),
            power_w=self.power(),
            gpu_load=self.gpu_load(),
            cpu_load=psutil.cpu_percent(None),
            memory_used=psutil.virtual_memory().percent,
            power_mode=self.power_mode(),
        )


class JtopProvider(Provider):
    """jetson-stats through its jtop service (needs /run/jtop.sock)."""

    name = "jtop"

    def __init__(self):
        from jtop import jtop  # jetson-stats

        self._jetson = jtop()
        self._jetson.start()

    def read(self) -> Reading:
        j = self._jetson
        stats = j.stats
        temps = {k: float(v) for k, v in (getattr(j, "temperature", {}) or {}).items() if isinstance(v, (int, float))}
        if not temps:
            temps = {k[5:]: float(v) for k, v in stats.items() if k.startswith("Temp ") and isinstance(v, (int, float)) and v > -40}
        power = stats.get("Power TOT")
        mode, clocks = jtop_power_state(j)
        return Reading(
            temperatures_c=temps,
            power_w=float(power) / 1000.0 if isinstance(power, (int, float)) else None,
            gpu_load=_num(stats.get("GPU")),
            cpu_load=psutil.cpu_percent(None),
            memory_used=psutil.virtual_memory().percent,
            power_mode=mode,
            jetson_clocks=clocks,
        )

    def close(self) -> None:
        self._jetson.close()


def jtop_power_state(jetson) -> tuple[str | None, bool | None]:
    """(nvpmodel mode name, jetson_clocks on) from a jtop client; None where the board has no such
    control. `jetson.jetson_clocks` is truthy when on (its `.status` is a word like 'inactive',
    always truthy, so it is not used)."""
    try:
        nvp = jetson.nvpmodel
        mode = str(nvp.name) if nvp is not None else None
    except Exception:  # jtop raises when nvpmodel is unavailable or not yet read
        mode = None
    try:
        jc = jetson.jetson_clocks
        clocks = bool(jc) if jc is not None else None
    except Exception:
        clocks = None
    return mode, clocks


def make_provider(kind: str, simulated_file: Path | None = None) -> Provider:
    """`kind` = auto | jtop | sysfs | simulated; auto tries jtop, then sysfs, then simulated."""
    if kind == "simulated":
        return SimulatedProvider(simulated_file)
    if kind in ("auto", "jtop"):
        if kind == "jtop" or JTOP_SOCKET.exists():
            try:
                return JtopProvider()
            except Exception as exc:
                if kind == "jtop":
                    raise RuntimeError(f"jtop telemetry unavailable: {exc}") from None
                log.info("jtop unavailable (%s); trying sysfs", exc)
    if kind in ("auto", "sysfs"):
        if kind == "sysfs" or Path("/sys/class/thermal").is_dir():
            return SysfsProvider()
    return SimulatedProvider(simulated_file)
