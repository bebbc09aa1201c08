"""The Grafana dashboard queries only metrics the daemons export."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def exported() -> set[str]:
    names: set[str] = set()
    for f in ("agentd/prometheus_collector.py", "controller/prometheus_collector.py"):
        names |= set(re.findall(r'"(shadowplane_[a-z_]+)"', (ROOT / f).read_text()))
    return names


def test_dashboard_queries_exported_metrics() -> None:
    dash = json.loads((ROOT / "deploy/grafana/shadowplane-service.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    used = {m for e in exprs for m in re.findall(r"shadowplane_[a-z_]+", e)}
    known = exported()
    for m in used:
        base = next((m.removesuffix(s) for s in SUFFIXES if m.endswith(s) and m.removesuffix(s) in known), m)
        assert base in known, f"dashboard uses {m}, which no collector exports"
    assert {
        "shadowplane_demand_cpu_cores",
        "shadowplane_forecast_cpu_cores",
        "shadowplane_shadow_cpu_limit_cores",
        "shadowplane_service_transitions_total",
    } <= used
