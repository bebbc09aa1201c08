"""Replaying a trace: what the controller would have set, step by step, next to today's recommenders.

At step t every policy may use usage up to t - lead only. The project's replay is the scaling loop's own
path (controller/scaling/planner.py) with the controller's configuration: forecast from origin t - lead,
calibration on the limit in force, target, the seed rule, floors, ceilings, memory's guard and slow way
down, and the change tolerance; the baselines see the same data. Everything here is a pure function of the
trace, the forecaster and the configuration, so the numbers can be re-derived.

The trace's values are taken in the resource's unit (cores for cpu, bytes for memory) after `scale`, so the
configured floors and ceilings mean what they mean in the controller.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agentd.actuate import limits
from controller.config import ScalingConfig
from controller.predict.allocation import AllocationState
from controller.predict.engine import PERIOD_REFRESH_SECONDS
from controller.predict.features import Periods, detect_periods, period_slots, refresh_steps, sliding_history
from controller.predict.model import Forecaster
from controller.scaling.planner import ShadowNow, Target, decide_resource, forecast_target, recent_changes
from shadowplane.v1 import agent_pb2 as apb
from training.baselines import autopilot_max, hindsight_blocks, seed_rule, vpa_recommender
from training.scores import (
    DAY,
    AllocationScores,
    mase,
    scaled_pinball,
    score_allocation,
    scored_mask,
    seasonal_naive,
)
from training.traces import Trace

F64 = npt.NDArray[np.float64]
PROJECT = "shadowplane"
VPA_EQUAL = "VPA @ equal cov."  # VPA-style scaled in hindsight to the project's coverage: the fair comparison
HINDSIGHT = "hindsight 7/day"  # a bound, not a policy: an oracle's limit with 7 changes a day
BASELINES = ("seed rule", "VPA-style", VPA_EQUAL, "Autopilot-style", HINDSIGHT)


class BacktestError(ValueError):
    """A backtest that cannot run as asked (e.g. lead beyond the horizon): the message says why."""


@dataclass(frozen=True)
class ForecastScores:
    quantiles: tuple[float, ...]
    pinball: tuple[float, ...]  # per quantile, divided by mean usage
    coverage: tuple[float, ...]  # share of steps at or under each quantile (calibration: should be ~q)
    mase: float  # P50 error relative to the seasonal-naive (same time yesterday) forecast


@dataclass(frozen=True)
class PolicyResult:
    name: str
    allocation: F64
    scores: AllocationScores
    oom_risk_steps: int = 0  # memory: scored steps with the limit below usage (an OOM kill on takeover)


@dataclass(frozen=True)
class Replay:
    """The project's side of a backtest, one entry per trace row."""

    allocation: F64  # the limit in force at each step
    forecast: F64  # (rows, Q): the quantiles for this step, forecast `lead` steps earlier; NaN if none
    quantile_used: F64  # the curve level the target was read at (NaN on steps that kept the policy's pick)
    target: F64  # the target the rule moved the limit towards
    branch: tuple[str, ...]  # the rule's branch at each step ("" before the first decision)


@dataclass(frozen=True)
class BacktestReport:
    trace: str
    rows: int
    step_seconds: int
    lead: int
    resource: str
    forecaster: str
    quantiles: tuple[float, ...]
    replay: Replay
    project: PolicyResult
    baselines: list[PolicyResult]
    forecast: ForecastScores
    notes: list[str] = field(default_factory=list)

    def result(self, name: str) -> PolicyResult:
        for r in [self.project, *self.baselines]:
            if r.name == name:
                return r
        raise KeyError(name)

    def slack_vs(self, baseline: str = VPA_EQUAL) -> float:
        base = self.result(baseline).scores.slack
        return self.project.scores.slack / base if base > 0 else math.inf


def forecast_origins(
    forecaster: Forecaster,
    trace: Trace,
    step_seconds: int | None = None,
    chunk: int = 4096,
    period_refresh_seconds: float = PERIOD_REFRESH_SECONDS,
) -> F64:
    """The forecaster's curve from every row of the trace as origin: (rows, horizon, Q). Row o uses the
    values up to and including row o only. Each row's cycle is the one detected for its slot of
    `period_refresh_seconds` (features.period_slots), as the controller's engine detects it (0: at every
    row)."""
    step = step_seconds or trace.step_seconds
    steps = forecaster.spec.history_steps(step)
    hist = sliding_history(trace.values, steps)
    ts = trace.timestamps.astype(np.float64)
    _, back = period_slots(ts, trace.step_seconds, refresh_steps(period_refresh_seconds, step))
    src = np.arange(len(trace)) - back  # the row at each slot's first step
    # A slot that began before the trace has no history at its start: no cycle, as in the controller,
    # whose history there is unknown.
    known = src >= 0
    rows = np.unique(src[known])
    found = detect_periods(np.asarray(hist[rows]), forecaster.spec)
    lag, err = np.zeros(len(trace), dtype=np.int64), np.zeros(len(trace))
    where = np.searchsorted(rows, src[known])
    lag[known], err[known] = found.lag[where], found.log_error[where]
    out = np.empty((len(trace), forecaster.horizon, len(forecaster.quantiles)))
    for start in range(0, len(trace), chunk):
        h = np.asarray(hist[start : start + chunk])
        sl = slice(start, start + chunk)
        out[sl] = forecaster.predict_rows(h, ts[sl], step, periods=Periods(lag[sl], err[sl]))
    return out


def replay_controller(
    timestamps: npt.NDArray[np.int64],
    usage: F64,
    curves: F64,
    quantiles: tuple[float, ...],
    cfg: ScalingConfig,
    resource: str = "cpu",
    lead: int = 1,
    host_capacity: float = 0.0,
    time_compression: float = 1.0,
) -> Replay:
    """The scaling loop's steps on a trace: step t's limit is decided at the end of step t - lead from the
    curve made there (read from its step `lead`), by `forecast_target` and `decide_resource` exactly as the
    controller calls them, with the shadow's own memory in use unknown (0: the demand's guard applies).
    Like a freshly placed shadow, it starts with no limit. `host_capacity`: the shadow host's cores or bytes
    (0: unbounded). `time_compression`: model seconds per second of `timestamps` (a lab replay's)."""
    n, horizon, nq = curves.shape
    if lead < 1:
        raise BacktestError(f"lead must be >= 1 step, got {lead}")
    if lead > horizon:
        raise BacktestError(f"lead {lead} is beyond the forecast horizon of {horizon} steps")
    if resource not in ("cpu", "memory"):
        raise BacktestError(f"resource must be cpu or memory, got {resource!r}")
    policy = cfg.allocation_policy()
    alloc = np.zeros(n)
    used = np.full(n, np.nan)
    target = np.full(n, np.nan)
    branch = [""] * n
    fc = np.full((n, nq), np.nan)
    fc[lead:] = curves[: n - lead, lead - 1, :]
    state = AllocationState.initial(policy)
    cpu = resource == "cpu"
    cap = float(host_capacity)
    changed_at = -math.inf  # when the limit last changed (seconds)
    changes: tuple[float, ...] = ()  # when it changed in the last day (the change budget)
    for t in range(lead, n):
        o = t - lead
        current = float(alloc[t - 1])
        value, shown, state = forecast_target(
            curves[o], quantiles, state, float(usage[o]), float(alloc[o]), policy, first_step=lead - 1
        )
        s = ShadowNow(
            "", "", "", current if cpu else 0.0, 0 if cpu else round(current), 0, cap if cpu else 0.0,
            0 if cpu else int(cap),
        )  # fmt: skip
        now = float(timestamps[o])
        changes = recent_changes(changes, now, time_compression)
        d = decide_resource(
            cfg, s, resource, "", Target(value, shown, ""), None, int(now * 1000), float(usage[o]),
            since_change_s=(now - changed_at) * time_compression, changes_in_day=len(changes),
        )  # fmt: skip
        if d.new != current:
            changed_at, changes = now, (*changes, now)
        alloc[t] = held_by_kernel(resource, d.new)
        target[t] = value
        used[t] = shown.get("target_quantile", math.nan)
        branch[t] = d.branch
    return Replay(alloc, fc, used, target, tuple(branch))


def held_by_kernel(resource: str, value: float) -> float:
    """What a shadow's cgroup holds after the agent applies `value` (agentd.actuate.limits.plan: CPU quota
    in steps of 1 % of a core, memory in whole pages), as the controller reads it back."""
    if resource == "cpu":
        return limits.plan(apb.SetLimits(cpu_cores=value), 0).cpu_cores
    return float(limits.plan(apb.SetLimits(memory_bytes=int(value)), 0).memory_max)


def scaled_to_coverage(
    timestamps: npt.NDArray[np.int64], usage: F64, alloc: F64, coverage: float, warmup_seconds: float = DAY
) -> F64:
    """`alloc` times the smallest factor that makes it cover `coverage` of the scored steps, found in
    hindsight: what a recommender would need to match another's coverage."""
    m = scored_mask(timestamps, warmup_seconds)
    u, a = usage[m], alloc[m]
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(u <= 0, 0.0, np.where(a > 0, u / a, np.inf))
    k = float(np.sort(need)[max(0, math.ceil(coverage * len(need) - 1e-9) - 1)]) if len(need) else 1.0
    return np.asarray(alloc * k) if math.isfinite(k) else np.asarray(alloc)


def score_forecast(
    trace: Trace, forecast: F64, quantiles: tuple[float, ...], lead: int, warmup_seconds: float = DAY
) -> ForecastScores:
    m = scored_mask(trace.timestamps, warmup_seconds) & ~np.isnan(forecast).any(axis=1)
    season = max(1, round(DAY / trace.step_seconds))
    naive = seasonal_naive(trace.values, season, lead)
    m &= ~np.isnan(naive)
    if not m.any():
        nan = tuple(math.nan for _ in quantiles)
        return ForecastScores(quantiles, nan, nan, math.nan)
    u, f = trace.values[m], forecast[m]
    p50 = int(np.argmin(np.abs(np.asarray(quantiles) - 0.5)))
    return ForecastScores(
        quantiles=quantiles,
        pinball=scaled_pinball(u, f, quantiles),
        coverage=tuple(float(np.mean(u <= f[:, i])) for i in range(len(quantiles))),
        mase=mase(u, f[:, p50], naive[m]),
    )


def run_backtest(
    trace: Trace,
    forecaster: Forecaster,
    lead: int = 1,
    cfg: ScalingConfig | None = None,
    warmup_seconds: float = DAY,
    resource: str = "cpu",
    host_capacity: float = 0.0,
) -> BacktestReport:
    """Replay `trace` through the controller's scaling step with `cfg` (default: the controller's defaults)
    and score it beside the baselines."""
    cfg = cfg or ScalingConfig()
    if len(trace) <= lead:
        raise BacktestError(f"{trace.name}: {len(trace)} rows is not more than the lead of {lead}")
    if not (trace.timestamps >= trace.timestamps[0] + warmup_seconds).any():
        raise BacktestError(
            f"{trace.name}: the trace covers less than the {warmup_seconds / 3600:g} h warm-up; nothing "
            "would be scored"
        )
    if lead > forecaster.horizon:
        raise BacktestError(f"lead {lead} is beyond the forecast horizon of {forecaster.horizon} steps")
    curves = forecast_origins(forecaster, trace)
    replay = replay_controller(
        trace.timestamps, trace.values, curves, forecaster.quantiles, cfg, resource, lead, host_capacity
    )
    ts, v = trace.timestamps, trace.values
    scored = scored_mask(ts, warmup_seconds)

    def result(name: str, alloc: F64) -> PolicyResult:
        oom = int(np.sum((alloc < v) & scored)) if resource == "memory" else 0
        return PolicyResult(name, alloc, score_allocation(ts, v, alloc, warmup_seconds), oom)

    project = result(PROJECT, replay.allocation)
    vpa = vpa_recommender(ts, v, lead)
    notes = []
    if trace.irregular_rows:
        notes.append(
            f"{trace.irregular_rows} rows are not {trace.step_seconds} s after the previous one; replayed "
            "row by row"
        )
    return BacktestReport(
        trace=trace.name,
        rows=len(trace),
        step_seconds=trace.step_seconds,
        lead=lead,
        resource=resource,
        forecaster=forecaster.name,
        quantiles=forecaster.quantiles,
        replay=replay,
        project=project,
        baselines=[
            result("seed rule", seed_rule(v, lead, cfg.rule_params())),
            result("VPA-style", vpa),
            result(VPA_EQUAL, scaled_to_coverage(ts, v, vpa, project.scores.coverage, warmup_seconds)),
            result("Autopilot-style", autopilot_max(ts, v, lead)),
            result(HINDSIGHT, hindsight_blocks(ts, v, scored, project.scores.coverage)),
        ],
        forecast=score_forecast(trace, replay.forecast, forecaster.quantiles, lead, warmup_seconds),
        notes=notes,
    )


def format_report(r: BacktestReport) -> str:
    p = r.project.scores
    lines = [
        f"trace {r.trace} ({r.resource}): {r.rows} rows, step {r.step_seconds} s, lead {r.lead}; {p.steps} "
        "steps scored after a 1-day warm-up",
        f"forecaster: {r.forecaster}",
        "",
        f"{'policy':<18}{'coverage':>10}{'shortfall':>11}{'slack':>9}{'changes/day':>13}"
        + (f"{'OOM-risk steps':>16}" if r.resource == "memory" else ""),
    ]
    for res in [r.project, *r.baselines]:
        s = res.scores
        lines.append(
            f"{res.name:<18}{s.coverage:>10.4f}{s.shortfall:>11.4f}{s.slack:>9.3f}{s.changes_per_day:>13.1f}"
            + (f"{res.oom_risk_steps:>16d}" if r.resource == "memory" else "")
        )
    lines.append("")
    lines.append(
        f"slack vs VPA-style at equal coverage: {r.slack_vs():.2f}x (vs VPA-style as configured: "
        f"{r.slack_vs('VPA-style'):.2f}x)"
    )
    f = r.forecast
    qs = "  ".join(f"q{q:g}={pl:.4f}" for q, pl in zip(f.quantiles, f.pinball, strict=True))
    cov = "  ".join(f"q{q:g}={c:.3f}" for q, c in zip(f.quantiles, f.coverage, strict=True))
    lines.append(f"forecast {r.lead} step(s) ahead: pinball loss / mean usage: {qs}")
    lines.append(f"  share of steps at or under each quantile: {cov}")
    lines.append(f"  MASE vs seasonal naive (same time yesterday): {f.mase:.3f}")
    lines.extend(f"note: {n}" for n in r.notes)
    return "\n".join(lines)


def _fmt_ts(t: int) -> str:
    return datetime.fromtimestamp(int(t), tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def write_alloc_csv(path: str | Path, trace: Trace, report: BacktestReport) -> None:
    """One row per trace row: timestamp, usage, allocation, the curve level the limit was set at, then
    the forecast quantiles for that step (empty where there was no forecast yet)."""
    qcols = [f"q{q:g}" for q in report.quantiles]
    rp = report.replay
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "usage", "allocation", "target", "branch", "quantile_used", *qcols])
        for i in range(len(trace)):
            # repr: the shortest text that reads back as the same float, so coverage recomputed from the
            # file agrees with the printed one exactly
            used = "" if math.isnan(rp.quantile_used[i]) else f"{rp.quantile_used[i]:.6g}"
            fq = ["" if math.isnan(x) else repr(float(x)) for x in rp.forecast[i]]
            ts = _fmt_ts(int(trace.timestamps[i]))
            tg = "" if math.isnan(rp.target[i]) else repr(float(rp.target[i]))
            row = [ts, repr(float(trace.values[i])), repr(float(rp.allocation[i])), tg, rp.branch[i], used]
            w.writerow([*row, *fq])
