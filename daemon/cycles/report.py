"""Cycle reports: `cycles/<id>/report.json` and `report.png`, written when a cycle ends.

The worker gathers what only it sees (the training loss curve, the channels each layer kept) and
sends it with its final event; the scheduler hands that and the cycle record to `write_report_async`,
which renders in a background thread so neither the event loop nor the scheduler's poll waits on
matplotlib (~0.5 s). Every ending gets a report, with whatever data exists: a cycle killed before
it trained has no curve, a failed one no channels.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_core.atomic import atomic_write
from prune_core.jsonsafe import is_finite_number

log = logging.getLogger("edgetune.report")
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
MAX_CURVE_POINTS = 1000


@dataclass
class LossCurve:
    """Training loss per SGD step across every training run of a cycle (fine-tune, ceiling, each
    probe of a level search), thinned to at most MAX_CURVE_POINTS by doubling the stride."""

    points: list[list[float]] = field(default_factory=list)  # [step, run, epoch, loss]
    step: int = 0
    run: int = 0
    stride: int = 1

    def add(self, epoch: int, batch: int, loss: float) -> None:
        if epoch == 1 and batch == 1:  # train() restarts: a new run begins
            self.run += 1
        self.step += 1
        if self.step % self.stride == 0:
            self.points.append([self.step, self.run, epoch, loss])
        if len(self.points) > MAX_CURVE_POINTS:
            self.points = self.points[1::2]
            self.stride *= 2


def channels_kept(before: dict[str, dict], after: dict[str, dict]) -> list[dict[str, Any]]:
    """Output channels of every convolution, served model vs candidate (from their channel plans)."""
    return [
        {"layer": name, "before": attrs["out_channels"], "after": after.get(name, {}).get("out_channels", 0)}
        for name, attrs in before.items() if "out_channels" in attrs
    ]


def build_report(record: dict, evidence: dict) -> dict:
    """The report's JSON: the record's outcome and metrics plus the worker's evidence."""
    m = record.get("metrics") or {}
    started, finished = record.get("started"), record.get("finished")
    return {
        "cycle_id": record["id"], "state": record["state"], "reason": record.get("reason"),
        "trigger": record.get("trigger"), "request": record.get("request"),
        "version_before": record.get("version_before"), "version_after": record.get("version_after"),
        "created": record.get("created"), "started": started, "finished": finished,
        "duration_s": finished - started if started and finished else None,
        "accuracy": {k: m.get(k) for k in ("top1_before", "top1_after", "top1_ceiling", "agreement_with_before", "expected_loss")},
        "size": {k: m.get(k) for k in ("params_before", "params_after", "macs_before", "macs_after")},
        "level": m.get("level"), "probes": m.get("probes", record.get("probes", [])),
        "paired_evidence": _paired_evidence(record.get("evidence") or {}),
        "cost": record.get("cost") or {},  # predicted beside actual
        "channels": evidence.get("channels") or [],
        "curve": [
            {"step": step, "run": run, "epoch": epoch, "loss": loss if math.isfinite(loss) else None}
            for step, run, epoch, loss in evidence.get("curve") or []
        ],
    }


def _paired_evidence(evidence: dict) -> dict:
    """What the candidate was judged on against its teacher (prune_core.evidence.JudgingEvidence),
    without the list of asked disagreements: their count."""
    return {**{k: v for k, v in evidence.items() if k != "asked"}, "asked": len(evidence.get("asked", []))} if evidence else {}


def render_png(report: dict, path: str) -> None:
    """Three panels: channels kept per layer, accuracy/agreement/size before vs after, the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # the object API: no pyplot state, safe off the main thread

    fig = Figure(figsize=(13, 4.2), dpi=90, layout="constrained")
    ax_ch, ax_acc, ax_curve = fig.subplots(1, 3, width_ratios=(1.6, 1, 1.4))
    title = f"cycle {report['cycle_id']}: {report['state']}"
    if report.get("version_before"):
        title += f"  ({report['version_before']} → {report.get('version_after') or 'not installed'})"
    fig.suptitle(title, fontweight="bold")
    if report.get("reason"):
        fig.supxlabel(report["reason"][:160], fontsize=8, color="#555")

    def empty(ax, what: str) -> None:
        ax.text(0.5, 0.5, f"no {what}\n(the cycle ended before it)", ha="center", va="center", color="#888", transform=ax.transAxes)
        ax.set_xticks([]), ax.set_yticks([])

    channels = report["channels"]
    ax_ch.set_title("output channels per conv layer")
    if channels:
        xs = range(len(channels))
        ax_ch.bar(xs, [c["before"] for c in channels], color="#cfd8dc", label="served")
        ax_ch.bar(xs, [c["after"] for c in channels], color="#1e88e5", width=0.55, label="kept")
        ax_ch.set_xticks(list(xs), [c["layer"] for c in channels], rotation=60, ha="right", fontsize=6 if len(channels) > 20 else 7)
        ax_ch.legend(fontsize=8)
    else:
        empty(ax_ch, "candidate")

    acc, size = report["accuracy"], report["size"]
    ax_acc.set_title("before → after")
    bars = [
        ("held-out top-1", acc.get("top1_before"), acc.get("top1_after")),
        ("agreement", 1.0 if is_finite_number(acc.get("agreement_with_before")) else None, acc.get("agreement_with_before")),
    ]
    if is_finite_number(size.get("params_before")) and size["params_before"]:
        bars.append(("params (rel.)", 1.0, size["params_after"] / size["params_before"]))
    if is_finite_number(size.get("macs_before")) and size["macs_before"]:
        bars.append(("MACs (rel.)", 1.0, size["macs_after"] / size["macs_before"]))
    bars = [b for b in bars if is_finite_number(b[1]) or is_finite_number(b[2])]
    if bars:
        xs = range(len(bars))
        before = [b[1] if is_finite_number(b[1]) else 0 for b in bars]
        after = [b[2] if is_finite_number(b[2]) else 0 for b in bars]
        ax_acc.bar([x - 0.2 for x in xs], before, 0.4, color="#cfd8dc", label="before")
        ax_acc.bar([x + 0.2 for x in xs], after, 0.4, color="#43a047", label="after")
        for x, v in zip(xs, after):
            ax_acc.text(x + 0.2, v + 0.01, f"{v:.3f}", ha="center", fontsize=7)
        ax_acc.set_xticks(list(xs), [b[0] for b in bars], fontsize=8, rotation=15)
        ax_acc.set_ylim(0, 1.15)
        ax_acc.legend(fontsize=8, loc="lower left")
    else:
        empty(ax_acc, "evaluation")

    curve = report["curve"]
    ax_curve.set_title("training loss")
    if curve:
        for run in sorted({p["run"] for p in curve}):
            pts = [p for p in curve if p["run"] == run]
            ax_curve.plot([p["step"] for p in pts], [p["loss"] if p["loss"] is not None else math.nan for p in pts], lw=1, label=f"run {run}")
        ax_curve.set_xlabel("SGD step")
        if len({p["run"] for p in curve}) > 1:
            ax_curve.legend(fontsize=7)
    else:
        empty(ax_curve, "training")

    fig.savefig(path, format="png")


def write_report(folder: Path, record: dict, evidence: dict) -> None:
    """Write report.json then report.png atomically; a failure is logged, never raised."""
    try:
        report = build_report(record, evidence)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / REPORT_JSON, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n"))
        atomic_write(folder / REPORT_PNG, lambda tmp: render_png(report, tmp))
    except Exception:
        log.exception("could not write the report of cycle %s", record.get("id"))


def write_report_async(folder: Path, record: dict, evidence: dict) -> threading.Thread:
    """Render in a (non-daemon) thread: a shutdown still finishes the report of the aborted cycle."""
    thread = threading.Thread(target=write_report, args=(folder, record, evidence), name=f"report-{record.get('id')}")
    thread.start()
    return thread
