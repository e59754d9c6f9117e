"""deploy/grafana/edgetune.json: a well-formed dashboard whose every query names real metrics."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "edgetune.json"
FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "label_values", "by", "le"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def _check_promql(expr: str) -> None:
    """A light syntax check (no PromQL parser on PyPI fits): brackets balance and pair up,
    label matchers are well formed, every identifier called is a known function."""
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr}"
    assert not stack, f"unclosed {stack} in {expr}"
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        for m in filter(None, (x.strip() for x in matchers.split(","))):
            assert re.fullmatch(r'[a-zA-Z_]\w*\s*(=~|!~|!=|=)\s*"[^"]*"', m), f"bad label matcher {m!r} in {expr}"
    for name in re.findall(r"\b([a-z_]+)\s*\(", expr):
        assert name in FUNCTIONS, f"unknown function {name}() in {expr}"
    for window in re.findall(r"\[([^\]]+)\]", expr):
        assert re.fullmatch(r"\$__rate_interval|\$__range|\d+[smhdw]", window), f"bad range {window!r} in {expr}"


def _exposed(metrics_text: str) -> set[str]:
    """Every series name /metrics can produce, also for families that have no sample yet."""
    names = set(re.findall(r"^(edgetune_\w+)", metrics_text, re.M))
    for family, kind in re.findall(r"^# TYPE (edgetune_\w+) (\w+)$", metrics_text, re.M):
        if kind == "counter":  # the TYPE line names the family with or without _total, by client version
            names.add(family if family.endswith("_total") else family + "_total")
        elif kind == "histogram":
            names |= {family + s for s in HISTOGRAM_SUFFIXES}
        else:
            names.add(family)
    return names


def test_dashboard_is_importable():
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("inference rate", "latency", "buffer", "outcome", "model size", "temperature", "power"):
        assert topic in titles


@pytest.mark.parametrize("expr", _queries(json.loads(DASHBOARD.read_text())))
def test_query_is_well_formed(expr):
    _check_promql(expr)


def test_every_queried_metric_exists(inproc):
    inproc.tick()  # one poll sets the telemetry, gate and buffer gauges
    exposed = _exposed(inproc.client.get("/metrics").text)
    queried = {name for expr in _queries(json.loads(DASHBOARD.read_text())) for name in re.findall(r"\bedgetune_\w+", expr)}
    assert len(queried) >= 20
    missing = sorted(queried - exposed)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"
    # the latency panels' quantiles need the histogram's buckets
    assert "edgetune_inference_latency_seconds_bucket" in queried
    # limits are drawn next to their readings
    assert {"edgetune_thermal_limit_celsius", "edgetune_power_budget_watts", "edgetune_buffer_max_samples", "edgetune_buffer_max_bytes"} <= queried
