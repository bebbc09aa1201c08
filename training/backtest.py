"""Replaying a trace: what the project would have allocated, step by step, next to today's recommenders.

At step t every policy may use usage up to t - lead only. The project forecasts from origin t - lead and
reads its allocation off the curve's step `lead` (see allocation.py); the baselines see the same data.
Everything here is a pure function of the trace and the forecaster, so the numbers can be re-derived.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from controller.predict.allocation import AllocationPolicy, AllocationState, allocate, observe
from controller.predict.features import detect_periods, sliding_history
from controller.predict.model import Forecaster
from controller.scaling.rule import DEFAULT_RULE, RuleParams
from training.baselines import autopilot_max, seed_rule, vpa_recommender
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
DEFAULT_POLICY = AllocationPolicy()
BASELINES = ("seed rule", "VPA-style", "Autopilot-style")


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


@dataclass(frozen=True)
class Replay:
    """The project's side of a backtest, one entry per trace row."""

    allocation: F64
    forecast: F64  # (rows, Q): the quantiles for this step, forecast `lead` steps earlier; NaN if none
    quantile_used: F64  # the curve level the limit was set at (NaN on steps that kept the limit)


@dataclass(frozen=True)
class BacktestReport:
    trace: str
    rows: int
    step_seconds: int
    lead: int
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

    def slack_vs(self, baseline: str = "VPA-style") -> float:
        base = self.result(baseline).scores.slack
        return self.project.scores.slack / base if base > 0 else math.inf


def forecast_origins(
    forecaster: Forecaster, trace: Trace, step_seconds: int | None = None, chunk: int = 4096
) -> F64:
    """The forecaster's curve from every row of the trace as origin: (rows, horizon, Q). Row o uses the
    values up to and including row o only."""
    step = step_seconds or trace.step_seconds
    steps = forecaster.spec.history_steps(step)
    hist = sliding_history(trace.values, steps)
    ts = trace.timestamps.astype(np.float64)
    out = np.empty((len(trace), forecaster.horizon, len(forecaster.quantiles)))
    for start in range(0, len(trace), chunk):
        h = np.asarray(hist[start : start + chunk])
        out[start : start + chunk] = forecaster.predict_rows(
            h, ts[start : start + chunk], step, periods=detect_periods(h, forecaster.spec)
        )
    return out


def replay_allocation(
    usage: F64,
    curves: F64,
    quantiles: tuple[float, ...],
    lead: int = 1,
    policy: AllocationPolicy = DEFAULT_POLICY,
) -> Replay:
    """Step t's limit comes from the curve made at origin t - lead, read from its step `lead`; before
    deciding, the policy learns whether the newest known step (t - lead) was covered."""
    n, horizon, nq = curves.shape
    if lead < 1:
        raise BacktestError(f"lead must be >= 1 step, got {lead}")
    if lead > horizon:
        raise BacktestError(f"lead {lead} is beyond the forecast horizon of {horizon} steps")
    alloc = np.zeros(n)
    used = np.full(n, np.nan)
    fc = np.full((n, nq), np.nan)
    fc[lead:] = curves[: n - lead, lead - 1, :]
    state = AllocationState.initial(policy)
    for t in range(lead, n):
        o = t - lead
        if t - lead >= lead:  # the step t - lead had a limit of ours
            state = observe(state, float(usage[o]), policy, allocation=float(alloc[o]))
        a = allocate(curves[o], quantiles, state, policy, first_step=lead - 1)
        state = a.state
        alloc[t] = a.allocation
        used[t] = a.quantile
    return Replay(alloc, fc, used)


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
    policy: AllocationPolicy = DEFAULT_POLICY,
    warmup_seconds: float = DAY,
    rule: RuleParams = DEFAULT_RULE,
) -> BacktestReport:
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
    replay = replay_allocation(trace.values, curves, forecaster.quantiles, lead, policy)
    ts, v = trace.timestamps, trace.values

    def result(name: str, alloc: F64) -> PolicyResult:
        return PolicyResult(name, alloc, score_allocation(ts, v, alloc, warmup_seconds))

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
        forecaster=forecaster.name,
        quantiles=forecaster.quantiles,
        replay=replay,
        project=result(PROJECT, replay.allocation),
        baselines=[
            result("seed rule", seed_rule(v, lead, rule)),
            result("VPA-style", vpa_recommender(ts, v, lead)),
            result("Autopilot-style", autopilot_max(ts, v, lead)),
        ],
        forecast=score_forecast(trace, replay.forecast, forecaster.quantiles, lead, warmup_seconds),
        notes=notes,
    )


def format_report(r: BacktestReport) -> str:
    p = r.project.scores
    lines = [
        f"trace {r.trace}: {r.rows} rows, step {r.step_seconds} s, lead {r.lead}; {p.steps} steps scored "
        "after a 1-day warm-up",
        f"forecaster: {r.forecaster}",
        "",
        f"{'policy':<18}{'coverage':>10}{'shortfall':>11}{'slack':>9}{'changes/day':>13}",
    ]
    for res in [r.project, *r.baselines]:
        s = res.scores
        lines.append(
            f"{res.name:<18}{s.coverage:>10.4f}{s.shortfall:>11.4f}{s.slack:>9.3f}{s.changes_per_day:>13.1f}"
        )
    lines.append("")
    lines.append(f"slack vs VPA-style: {r.slack_vs():.2f}x")
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
        w.writerow(["timestamp", "usage", "allocation", "quantile_used", *qcols])
        for i in range(len(trace)):
            # repr: the shortest text that reads back as the same float, so coverage recomputed from the
            # file agrees with the printed one exactly
            used = "" if math.isnan(rp.quantile_used[i]) else f"{rp.quantile_used[i]:.6g}"
            fq = ["" if math.isnan(x) else repr(float(x)) for x in rp.forecast[i]]
            ts = _fmt_ts(int(trace.timestamps[i]))
            w.writerow([ts, repr(float(trace.values[i])), repr(float(rp.allocation[i])), used, *fq])
