"""Lab scenarios: drive demand in a primary's workload cgroup and record how the shadow follows.

`step_load` runs a CPU load in the primary's cgroup that steps up and later down, and every `sample` seconds
records: the primary's demand (its latest telemetry), the forecast the scaling controller last used (its
quantiles and target) and the shadow's allocation as its cgroup files say (not as the controller thinks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentd.cgroupfs import CgroupLayout, read_cgroup
from lab.runner import Lab
from shadowplane.v1 import fleet_pb2 as fpb


@dataclass(frozen=True)
class Row:
    t: float  # seconds since the scenario started
    target_demand_cores: float  # what the load generator was asked for
    demand_cores: float | None  # the primary's latest telemetry sample
    forecast_q50_cores: float | None
    forecast_q99_cores: float | None
    forecast_target_cores: float | None
    shadow_cpu_limit_cores: float  # read from the shadow's cgroup files; 0 = no limit
    shadow_memory_limit_bytes: int
    shadow_cgroup: str


@dataclass(frozen=True)
class Phase:
    until: float  # seconds since start
    cores: float


def step_phases(baseline: float, high: float, before: float, during: float, after: float) -> list[Phase]:
    return [Phase(before, baseline), Phase(before + during, high), Phase(before + during + after, baseline)]


def demand_at(phases: list[Phase], t: float) -> float:
    for p in phases:
        if t < p.until:
            return p.cores
    return phases[-1].cores


class Probe:
    """Reads what a scenario records, from the controller's API and from the shadow's cgroup files."""

    def __init__(self, lab: Lab, service: str | None = None, shadow: str | None = None) -> None:
        self.lab = lab
        self.svc = lab.service(service)
        self.shadow = shadow or self.svc.shadows[0]
        self.cgroup = self.svc.cgroup(self.shadow)
        self.layout = CgroupLayout.detect()

    def demand(self) -> float | None:
        resp = self.lab.fleet().GetTelemetry(
            fpb.GetTelemetryRequest(host=self.svc.primary, workload=self.svc.name, limit=1), timeout=5
        )
        if not resp.samples:
            return None
        s = resp.samples[-1].sample
        return s.resources.cpu_seconds / max(1e-3, (s.end_unix_ms - s.start_unix_ms) / 1000)

    def forecast(self) -> tuple[float | None, float | None, float | None]:
        plan = self.lab.fleet().GetPlan(
            fpb.GetPlanRequest(workload=f"{self.shadow}/{self.svc.name}", last=1), timeout=5
        )
        cpu = [d for d in plan.last if d.resource == "cpu"]
        if not cpu:
            return None, None, None
        f = cpu[-1].forecast
        return f.get("q0.5"), f.get("q0.99"), f.get("target")

    def allocation(self) -> tuple[float, int]:
        r = read_cgroup(self.layout, self.cgroup)
        return r.cpu_limit_cores, r.memory_limit_bytes


def step_load(
    lab: Lab,
    baseline: float = 0.1,
    high: float = 0.8,
    before: float = 20.0,
    during: float = 30.0,
    after: float = 40.0,
    sample: float = 1.0,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    probe = Probe(lab)
    phases = step_phases(baseline, high, before, during, after)
    profile = Path(tempfile.mkdtemp(prefix="sp-scenario-")) / "cores"
    profile.write_text(f"{baseline}\n")
    layout = CgroupLayout.detect()
    procs_files = [d / "cgroup.procs" for d in layout.dirs(lab.service().cgroup(lab.service().primary))]

    def join_cgroup() -> None:
        for f in procs_files:
            f.write_text(str(os.getpid()))

    load = lab.popen_in(
        lab.service().primary,
        [sys.executable, "-m", "lab.loadgen", "cpu", "--profile", str(profile)],
        name="scenario-load",
        preexec_fn=join_cgroup,
    )
    rows: list[Row] = []
    t0 = time.monotonic()
    try:
        while (t := time.monotonic() - t0) < phases[-1].until:
            want = demand_at(phases, t)
            profile.write_text(f"{want}\n")
            q50, q99, target = probe.forecast()
            cpu, mem = probe.allocation()
            row = Row(round(t, 1), want, probe.demand(), q50, q99, target, cpu, mem, probe.cgroup)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            time.sleep(max(0.0, sample - (time.monotonic() - t0 - t)))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(load.pid, signal.SIGKILL)  # the load's workers too
        load.wait()
        profile.unlink(missing_ok=True)
        profile.parent.rmdir()
    return rows


def row_dict(r: Row) -> dict[str, Any]:
    return asdict(r)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def row_text(r: Row) -> str:
    cols = [
        fmt(r.demand_cores),
        fmt(r.forecast_q50_cores),
        fmt(r.forecast_q99_cores),
        fmt(r.forecast_target_cores),
    ]
    return (
        f"{r.t:6.1f}  {r.target_demand_cores:6.2f}  "
        + "  ".join(f"{c:>6}" for c in cols)
        + (f"  {r.shadow_cpu_limit_cores:6.2f}")
    )


HEADER = "     t    load  demand  fc q50  fc q99  target  shadow cpu limit (cores, from its cgroup files)"
