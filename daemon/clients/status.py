"""`edgetune status` and `edgetune watch`: the daemon seen from an SSH session on the device.

Both only read the HTTP API (daemon.clients.http): `status` prints /status as
tables, `watch` follows the current or next cycle with progress bars until it ends.
"""
from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from prune_core.errors import UsageError

from ..cycles.cycle_state import CycleState
from .http import DEFAULT_URL, ApiClient, ApiError, Unreachable

STYLE = {
    CycleState.ACCEPTED: "green", CycleState.REJECTED: "yellow", CycleState.FAILED: "red", CycleState.ABORTED: "yellow",
    CycleState.RUNNING: "cyan", CycleState.PAUSED: "yellow", CycleState.PENDING: "cyan",
}


def _state(cycle: dict) -> CycleState:
    return CycleState(cycle["state"])


def _styled(state: CycleState) -> str:
    return f"[{STYLE.get(state, 'white')}]{state}[/]"


class Daemon:
    """GETs against the daemon; any failure becomes a one-line UsageError."""

    def __init__(self, url: str, token: str | None):
        try:
            self.client = ApiClient(url, token, timeout=10)
        except ValueError as exc:
            raise UsageError(f"--url: {exc}") from None
        self.url = self.client.url

    def get(self, path: str) -> Any:
        try:
            return self.client.get(path)
        except ApiError as exc:
            raise UsageError(f"{self.url}{path}: HTTP {exc.status}: {exc.detail}") from None
        except Unreachable as exc:
            raise UsageError(f"{exc}; is `edgetune serve` running? (--url)") from None


def _si(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:g}"


def _mib(v: Any) -> str:
    return f"{v / 2**20:.1f} MiB" if isinstance(v, (int, float)) else "–"


def _of(value: Any, limit: Any, unit: str, fmt: str = "{:.1f}") -> str:
    shown = fmt.format(value) + unit if isinstance(value, (int, float)) else "–"
    return shown + (f"  (limit {limit:g}{unit})" if isinstance(limit, (int, float)) else "")


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "–"


def _table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title="\n" + title, title_justify="left", show_header=False, box=None, padding=(0, 2), title_style="bold")
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if not isinstance(value, (int, float)) else str(value))
    return table


def _cycle_rows(c: dict) -> list[tuple[str, Any]]:
    state = _state(c)
    rows = [("cycle", c["id"]), ("state", _styled(state)), ("trigger", c["trigger"] + (" (forced)" if c.get("forced") else ""))]
    if c.get("step") and not state.final:
        rows.append(("step", c["step"]))
    p = c.get("progress") or {}
    if not state.final and isinstance(p.get("loss"), (int, float)):
        rows.append(("training", f"epoch {p['epoch']}, batch {p['batch']}/{p['batches_per_epoch']}, loss {p['loss']:.3f}"))
    m = c.get("metrics") or {}
    if "params_before" in m:
        rows.append(("params", f"{_si(m['params_before'])} → {_si(m['params_after'])}"))
        rows.append(("held-out top-1", f"{_pct(m.get('top1_before'))} → {_pct(m.get('top1_after'))}"))
    if c.get("reason"):
        rows.append(("reason", c["reason"]))
    return rows


def _serving_rows(serving: dict | None) -> list:
    """The backend serving the model, its batch-1 forward time and why each other backend is not serving."""
    if not serving:
        return []
    rows = [("backend", f"{serving['engine']}, {serving['latency_ms']:.3g} ms at batch 1")]
    building = (serving.get("rebuild") or {}).get("building")
    if building:
        rows.append(("building", f"{', '.join(building['backends'])} engine for {building['version']} (torch serves meanwhile)"))
    rows += [(f"not {backend}", why) for backend, why in serving["skipped"].items()]
    return rows


def print_status(status: dict, console: Console) -> None:
    model = status.get("model")
    if model:
        console.print(_table("Model", [
            ("version", f"[bold]{model['version']}[/]"), ("arch", model["arch"]), ("params", _si(model["params"])),
            ("MACs", _si(model["macs"])), ("input", f"{model['input_size']}px, {model['num_classes']} classes"), ("device", model["device"]),
            *_serving_rows(model.get("serving")),
        ]))
    else:
        console.print("[red]no model loaded[/]")
    b = status["buffer"]
    per_class = ", ".join(f"{k}: {n}" for k, n in sorted(b["per_class"].items(), key=lambda kv: -kv[1])) or "empty"
    console.print(_table("Buffer", [
        ("samples", f"{b['samples']} / {b['max_rows']}"), ("bytes", f"{_mib(b['bytes'])} / {_mib(b['max_bytes'])}"),
        ("labelled", b["labelled"]), ("held out", b["held_out"]), ("evicted", b["evicted"]), ("per class", per_class),
    ]))
    s = status["scheduler"]
    gate = "[green]open[/]" if s["gate_open"] else "[red]closed[/]"
    conditions = "  ".join(f"{'[green]✓' if s[c] else '[red]✗'} {c.replace('_ok', '')}[/]" for c in ("idle", "load_ok", "thermal_ok", "power_ok", "samples_ok"))
    rows = [("gate", gate), ("conditions", conditions), ("scheduler", s["state"]), ("periodic cycles", "on" if s["auto_cycles"] else "off")]
    rows += [("closed because", reason) for reason in s.get("why_not_running") or []]
    console.print(_table("Gate", rows))
    t, lim = status["telemetry"], status["telemetry"].get("limits") or {}
    console.print(_table(f"Telemetry ({t['provider']})", [
        ("temperature", _of(t.get("max_temperature_c"), lim.get("thermal_limit_c"), "°C")),
        ("power", _of(t.get("power_w"), lim.get("power_budget_w"), " W")),
        ("CPU load", _of(t.get("cpu_load"), lim.get("max_cpu_load"), "%", "{:.0f}")),
        ("GPU load", _of(t.get("gpu_load"), lim.get("max_gpu_load"), "%", "{:.0f}")),
        ("memory", _of(t.get("memory_used"), None, "%", "{:.0f}")),
    ]))
    cycle = status.get("cycle")
    console.print(_table("Cycle", _cycle_rows(cycle)) if cycle else _table("Cycle", [("cycle", "none yet")]))


def _daemon(args) -> Daemon:
    return Daemon(args.url, args.token)


def cmd_status(args) -> None:
    print_status(_daemon(args).get("/status"), Console())


def cmd_watch(args) -> None:
    """Follow the current cycle, or wait for the next one, until it ends; then print its outcome."""
    daemon, console = _daemon(args), Console()
    first = daemon.get("/status").get("cycle")
    already_over = first["id"] if first and _state(first).final else None  # not the one to follow
    deadline = time.monotonic() + args.timeout if args.timeout else None
    following: str | None = None
    seen: tuple = ()
    probes_seen = 0
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bars:
        overall = bars.add_task("waiting for a cycle", total=None, info="")
        training = bars.add_task("training", total=None, info="", visible=False)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise UsageError(f"gave up after --timeout {args.timeout:g}s" + (f" (cycle {following} still running)" if following else " (no cycle started)"))
            if following is None:
                status = daemon.get("/status")
                cycle = status.get("cycle")
                if cycle is None or cycle["id"] == already_over:
                    reasons = "; ".join(status["scheduler"].get("why_not_running") or []) or "gate open"
                    bars.update(overall, description="waiting for a cycle", info=reasons[:80])
                    time.sleep(args.interval)
                    continue
                following = cycle["id"]
                bars.console.print(f"following cycle [bold]{following}[/] ({cycle['trigger']})")
            else:
                cycle = daemon.get(f"/cycles/{following}")
            state, step = _state(cycle), cycle.get("step")
            if (state, step) != seen:
                seen = (state, step)
                waiting = state in (CycleState.WAITING, CycleState.PAUSED, CycleState.PENDING)
                bars.console.print(f"{time.strftime('%H:%M:%S')} {state}" + (f" · {step}" if step and not state.final else "")
                                   + (f" · {cycle['reason']}" if cycle.get("reason") and waiting else ""))
            for probe in cycle.get("probes", [])[probes_seen:]:
                bars.console.print(f"  probe level {probe['level']}: top-1 {_pct(probe.get('accuracy'))}, {_si(probe.get('params'))} params{' (feasible)' if probe.get('feasible') else ''}")
            probes_seen = len(cycle.get("probes", []))
            bars.update(overall, description=f"cycle {following}", info=f"{state}" + (f" · {step}" if step else ""))
            p = cycle.get("progress") or {}
            if isinstance(p.get("batches_per_epoch"), int) and not state.final:
                bars.update(training, visible=True, description=f"epoch {p['epoch']}", total=p["batches_per_epoch"], completed=p["batch"], info=f"loss {p['loss']:.3f}")
            if state.final:
                bars.update(overall, total=1, completed=1)
                bars.update(training, visible=False)
                break
            time.sleep(args.interval)
    console.print(f"cycle {following} {_styled(state)}: {cycle.get('reason') or ''}")
    if cycle.get("version_after"):
        console.print(f"now serving {cycle['version_after']} (was {cycle.get('version_before')})")
    console.print(_table("Result", _cycle_rows(cycle)[3:]))
    console.print(f"report: {daemon.url}/cycles/{following}/report.png")


def _daemon_arguments(p) -> None:
    p.add_argument("--url", default=os.environ.get("EDGETUNE_URL", DEFAULT_URL), help=f"the daemon (default $EDGETUNE_URL or {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("EDGETUNE_API_TOKEN"), help="API token (default $EDGETUNE_API_TOKEN)")


def add_status_arguments(p) -> None:
    """`edgetune status`'s arguments and command."""
    _daemon_arguments(p)
    p.set_defaults(func=cmd_status)


def add_watch_arguments(p) -> None:
    """`edgetune watch`'s arguments and command."""
    _daemon_arguments(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")
    p.set_defaults(func=cmd_watch)
