"""`lab scenario replay`: a real trace as CPU demand in the primary's cgroup, with time compressed, and the
shadow's real cgroup limit scored against the demand the agent actually measured, beside the backtest.

Each trace row lasts one forecast step of the lab's controller (`scaling.forecast_step_seconds`, one
scaling interval): `--speed` is the trace's step over that, and the model sees each lab step as one of its
own. Rows start on the controller's step grid, so the demand of row i is what the controller resamples
into one step. Every step the shadow's CPU limit is read from its cgroup files late in the step (after the
controller set it for that step); the primary's measured demand per step comes from its telemetry afterwards,
resampled as the controller resamples it.

Three figures over the same scored rows (after a warm-up that is not scored):
  lab                 the shadow's real limit vs the measured demand
  backtest, measured  `shadowctl backtest`'s path (training/backtest.py) on the demand the controller saw,
                      at its timestamps: the same path offline; it should agree with the lab
  backtest, trace     the same path on the trace as given (what `shadowctl backtest --scale` prints)
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agentd.cgroupfs import CgroupLayout, read_cgroup
from controller.config import ScalingConfig, load_controller_config
from controller.predict.features import resample
from controller.predict.model import DEFAULT_MODEL, Forecaster, load_model
from lab.runner import Lab, LabError
from shadowplane.v1 import fleet_pb2 as fpb
from training.backtest import forecast_origins, replay_controller
from training.traces import Trace

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ReplayStep:
    row: int  # trace row
    end_unix_s: float  # the step's end on the controller's grid
    asked_cores: float  # what the load generator was asked for
    shadow_cpu_limit_cores: float  # from the shadow's cgroup files, late in the step; 0 = no limit


@dataclass(frozen=True)
class Score:
    coverage: float  # share of scored steps with limit >= demand
    slack: float  # unused limit / total demand
    changes_per_day: float  # limit changes per day of trace (model) time


@dataclass(frozen=True)
class ReplayReport:
    trace: str
    speed: float
    step_seconds: float  # real seconds per row
    warmup_rows: int
    scored_rows: int
    measured_steps: int  # scored steps with a measured demand (the others are not scored)
    same_limit_share: float  # scored steps where the shadow's real limit is the offline replay's, exactly
    lab: Score
    backtest_measured: Score
    backtest_trace: Score
    steps: list[ReplayStep]
    measured: F64  # demand per row as the agent measured it (NaN: no sample in the step)

    def text(self) -> str:
        rows = [
            ("lab: shadow's cgroup limit", self.lab),
            ("backtest on the measured demand", self.backtest_measured),
            ("backtest on the trace", self.backtest_trace),
        ]
        out = [
            f"trace {self.trace}: rows {self.warmup_rows} warm-up + {self.scored_rows} scored, speed "
            f"{self.speed:g} ({self.step_seconds:g} s per {self.step_seconds * self.speed:g} s step); "
            f"{self.measured_steps} scored steps measured",
            f"{'':34}{'coverage':>10}{'slack':>8}{'changes/day':>13}",
        ]
        out += [f"{n:34}{s.coverage:>10.4f}{s.slack:>8.3f}{s.changes_per_day:>13.1f}" for n, s in rows]
        d = abs(self.lab.coverage - self.backtest_measured.coverage) * 100
        out.append(
            f"lab vs backtest on the measured demand: {d:.2f} points of coverage; the shadow's limit is the "
            f"backtest's on {self.same_limit_share:.1%} of the scored steps"
        )
        return "\n".join(out)


def score(limit: F64, demand: F64, step_model_seconds: float) -> Score:
    ok = ~np.isnan(demand)
    lim, dem = limit[ok], demand[ok]
    total = float(np.abs(dem).sum()) or 1.0
    changes = int(np.sum(~np.isclose(limit[1:], limit[:-1], rtol=1e-9, atol=0.0)))
    days = len(limit) * step_model_seconds / 86400
    return Score(
        coverage=float(np.mean(lim >= dem)) if len(dem) else math.nan,
        slack=float(np.maximum(lim - dem, 0).sum() / total),
        changes_per_day=changes / days if days else math.nan,
    )


def offline(
    model: Forecaster,
    ts: npt.NDArray[np.int64],
    values: F64,
    scaling: ScalingConfig,
    model_step: int,
    compression: float,
) -> F64:
    """The backtest's path on a series: the limit at every row."""
    trace = Trace("replay", ts, values)
    curves = forecast_origins(model, trace, step_seconds=model_step)
    return replay_controller(
        ts, values, curves, model.quantiles, scaling, "cpu", time_compression=compression
    ).allocation


def replay(
    lab: Lab,
    trace: Trace,
    speed: float,
    peak_cores: float = 1.0,
    start_row: int = 0,
    warmup_rows: int = 288,
    rows: int = 288,
    on_step: Callable[[ReplayStep], None] | None = None,
) -> ReplayReport:
    scaling = load_controller_config(lab.workdir / "controller.toml").scaling
    step = scaling.forecast_step_seconds or scaling.interval_seconds
    if not math.isclose(trace.step_seconds / speed, step, rel_tol=1e-6):
        raise LabError(
            f"--speed {speed:g}: this lab's forecast step is {step:g} s, so a {trace.step_seconds} s trace "
            f"replays at --speed {trace.step_seconds / step:g} (or bring a lab up with "
            f"--scaling-interval {trace.step_seconds / speed:g})"
        )
    end_row = min(len(trace), start_row + warmup_rows + rows)
    if end_row - start_row <= warmup_rows:
        raise LabError(f"the trace has {len(trace)} rows: nothing to score after {warmup_rows} warm-up rows")
    values = trace.values[start_row:end_row]
    scale = peak_cores / float(np.max(values)) if np.max(values) > 0 else 1.0
    asked = values * scale
    svc = lab.service()
    layout = CgroupLayout.detect()
    shadow_cgroup = svc.cgroup(svc.shadows[0])
    profile = Path(tempfile.mkdtemp(prefix="sp-replay-")) / "cores"
    profile.write_text("0\n")
    procs_files = [d / "cgroup.procs" for d in layout.dirs(svc.cgroup(svc.primary))]

    def join_cgroup() -> None:
        for f in procs_files:
            f.write_text(str(os.getpid()))

    load = lab.popen_in(
        svc.primary,
        [sys.executable, "-m", "lab.loadgen", "cpu", "--profile", str(profile)],
        name="replay-load",
        preexec_fn=join_cgroup,
    )
    steps: list[ReplayStep] = []
    first_end = (math.floor(time.time() / step) + 2) * step  # rows start on the controller's grid
    try:
        for i, cores in enumerate(asked):
            begin = first_end - step + i * step
            _sleep_until(begin)
            profile.write_text(f"{cores}\n")
            _sleep_until(begin + 0.8 * step)  # the controller set this step's limit just after it began
            held = read_cgroup(layout, shadow_cgroup).cpu_limit_cores
            s = ReplayStep(start_row + i, begin + step, float(cores), held)
            steps.append(s)
            if on_step is not None:
                on_step(s)
        _sleep_until(first_end + len(asked) * step + 3 * lab.plan.spec.timings.agent_interval_seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(load.pid, signal.SIGKILL)
        load.wait()
        profile.unlink(missing_ok=True)
        profile.parent.rmdir()
    # The offline replay starts where the controller's history of this primary starts (the lab was up before
    # the trace began): same history, same calibration from the first step on.
    ends, demand = measured_demand(lab, first_end + (len(asked) - 1) * step, step)
    first = int(np.searchsorted(ends, round(first_end)))
    if first + len(asked) > len(ends) or ends[first] != round(first_end):
        raise LabError(f"the primary's telemetry does not cover the replay (steps {ends[0]} to {ends[-1]})")
    measured = demand[first : first + len(asked)]
    limit = np.array([s.shadow_cpu_limit_cores for s in steps])
    model = load_model(scaling.model or DEFAULT_MODEL)
    model_step = model.info.step_seconds
    compression = model_step / step
    sc = slice(warmup_rows, None)
    bt_measured = offline(model, ends, demand, scaling, model_step, compression)[first : first + len(asked)]
    bt_trace = offline(model, trace.timestamps[start_row:end_row], asked, scaling, model_step, 1.0)
    return ReplayReport(
        trace=trace.name,
        speed=speed,
        step_seconds=step,
        warmup_rows=warmup_rows,
        scored_rows=len(asked) - warmup_rows,
        measured_steps=int(np.sum(~np.isnan(measured[sc]))),
        same_limit_share=float(np.mean(np.isclose(limit[sc], bt_measured[sc], rtol=1e-6, atol=1e-9))),
        lab=score(limit[sc], measured[sc], model_step),
        backtest_measured=score(bt_measured[sc], measured[sc], model_step),
        backtest_trace=score(bt_trace[sc], asked[sc], model_step),
        steps=steps,
        measured=measured,
    )


def measured_demand(lab: Lab, until_s: float, step: float) -> tuple[npt.NDArray[np.int64], F64]:
    """The primary's CPU demand per step from its first sample on (the controller's whole history of it), from
    its telemetry, resampled as the controller resamples it: (step end times, mean of the samples that end in
    each step, NaN where none)."""
    svc = lab.service()
    resp = lab.fleet().GetTelemetry(
        fpb.GetTelemetryRequest(host=svc.primary, workload=svc.name, limit=10_000), timeout=60
    )
    end_s = np.array([s.sample.end_unix_ms / 1000 for s in resp.samples])
    cores = np.array(
        [
            s.sample.resources.cpu_seconds / max(1e-3, (s.sample.end_unix_ms - s.sample.start_unix_ms) / 1000)
            for s in resp.samples
        ]
    )
    if not len(end_s):
        raise LabError(f"no telemetry from {svc.primary}: is its agent connected?")
    grid, v = resample(end_s, cores, step, until_s=until_s)
    return np.round(grid).astype(np.int64), v


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.5))


def report_dict(r: ReplayReport) -> dict[str, object]:
    """The report without its per-step rows (printed as they came)."""
    out = {k: v for k, v in r.__dict__.items() if k not in ("steps", "measured")}
    for k in ("lab", "backtest_measured", "backtest_trace"):
        out[k] = getattr(r, k).__dict__
    return out
