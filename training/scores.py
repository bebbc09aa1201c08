"""Scores for an allocation and for a quantile forecast: pure functions over arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
DAY = 86400


@dataclass(frozen=True)
class AllocationScores:
    coverage: float  # fraction of scored steps with allocation >= usage
    shortfall: float  # unserved demand / total demand
    slack: float  # unused allocation / total demand
    changes_per_day: float  # how often the limit moves
    steps: int  # scored steps


def scored_mask(timestamps: npt.NDArray[np.int64], warmup_seconds: float = DAY) -> npt.NDArray[np.bool_]:
    """Steps that count: every row from the first one a warm-up (a day) after the start (rows, not times,
    so a clock that steps back does not put a row back into the warm-up)."""
    return np.asarray(np.logical_or.accumulate(timestamps >= timestamps[0] + warmup_seconds))


def score_allocation(
    timestamps: npt.NDArray[np.int64], usage: F64, alloc: F64, warmup_seconds: float = DAY
) -> AllocationScores:
    m = scored_mask(timestamps, warmup_seconds)
    n = int(m.sum())
    if n == 0:
        raise ValueError("nothing to score: the trace is no longer than its warm-up")
    u, a = usage[m], alloc[m]
    demand = float(np.abs(u).sum())
    denom = demand if demand > 0 else 1.0
    # A change is scored on the step where the new limit takes effect, so the first scored step compares
    # with the last warm-up step.
    first = int(np.argmax(m))
    prev = alloc[first - 1 : len(alloc) - 1] if first > 0 else np.concatenate([[alloc[0]], alloc[:-1]])
    prev = prev[-n:]
    changed = ~np.isclose(a, prev, rtol=1e-9, atol=0.0)
    step = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 1.0
    days = (float(timestamps[-1] - timestamps[first]) + step) / DAY
    return AllocationScores(
        coverage=float(np.mean(a >= u)),
        shortfall=float(np.maximum(u - a, 0).sum() / denom),
        slack=float(np.maximum(a - u, 0).sum() / denom),
        changes_per_day=float(changed.sum() / days),
        steps=n,
    )


def pinball_loss(actual: F64, forecast: F64, q: float) -> float:
    """Mean pinball (quantile) loss of `forecast` as the q-quantile of `actual`."""
    d = actual - forecast
    return float(np.mean(np.maximum(q * d, (q - 1) * d)))


def scaled_pinball(actual: F64, forecasts: F64, quantiles: tuple[float, ...]) -> tuple[float, ...]:
    """Pinball loss per quantile divided by mean |actual|, so traces in bytes and in percent compare."""
    scale = float(np.mean(np.abs(actual))) or 1.0
    return tuple(pinball_loss(actual, forecasts[:, i], q) / scale for i, q in enumerate(quantiles))


def mase(actual: F64, forecast: F64, naive: F64) -> float:
    """Mean absolute error relative to a reference (seasonal-naive) forecast on the same steps: < 1 beats
    it."""
    ref = float(np.mean(np.abs(actual - naive)))
    err = float(np.mean(np.abs(actual - forecast)))
    if ref == 0:
        return 0.0 if err == 0 else float("inf")
    return err / ref


def seasonal_naive(values: F64, season_steps: int, lead: int = 1) -> F64:
    """The value one season (a day) earlier, or, if that is not yet known `lead` steps ahead, the season
    before: the forecast anyone could make with no model at all. NaN where no such value exists."""
    out = np.full(len(values), np.nan)
    k = max(1, -(-lead // season_steps)) * season_steps
    out[k:] = values[:-k] if k < len(values) else []
    return out
