"""From a quantile curve to a shadow allocation: a pure function, called once per series per cycle.

The question each cycle is "what limit, for the next `span` steps?". A fixed quantile (say P99 every step)
wastes capacity: on a step where the forecast's upper tail is long (a spike may or may not come), covering
it costs far more than on a step where the tail is tight, yet both count the same towards coverage. So the
allocation is priced instead:

    cost(a) = E[(a - usage)+] / level  +  price * P(usage > a)

expected unused capacity (relative to the series' level, so one price fits any unit) plus a price per
missed step. For every served step the allocation minimising the cost is read off the curve; the limit is
the largest of them (a shadow must be ready for the worst step it serves). Where the tail is steep the
optimum sits at a lower quantile, where it is flat at a higher one: the miss budget goes where covering
is dearest.

The price is not a constant: `observe` moves it after each step, up after a miss and down after a
covered step, in the proportion that makes the long-run share of covered steps `target_coverage` (the
online quantile-tracking rule of adaptive conformal inference, applied to log(price)). This is the
calibration: whatever the forecaster's own calibration on this series, coverage converges to the target,
and a series the forecaster is sharp on gets a low price and little slack.

Hysteresis: the limit in force is kept unless moving saves more than `change_cost` of expected cost per
served step, so limits change a few times an hour at most, not every step; a limit that has become too
low is always raised, because its miss term makes keeping it expensive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

# The curve is read at these levels (linear in logit(q) between the model's quantiles, extrapolated
# beyond them): fine in the body, finer in the upper tail where allocations live, and far beyond the
# model's top quantile, so that a forecaster that is too narrow for a series can still be calibrated to
# cover it (at a high price).
_TAU = np.concatenate(
    [
        np.arange(0.02, 0.99, 0.02),
        [0.985, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999],
        1 - np.logspace(-5, -12, 15),
    ]
)
_EDGES = np.concatenate([[0.0], (_TAU[1:] + _TAU[:-1]) / 2, [1.0]])
_MASS = np.diff(_EDGES)  # probability mass each grid level stands for
_CUM_MASS = np.cumsum(_MASS)


@dataclass(frozen=True)
class AllocationPolicy:
    target_coverage: float = 0.992  # long-run share of steps with allocation >= usage
    span: int = 3  # horizon steps one decision serves, from `first_step`
    change_cost: float = 0.1  # expected cost per served step a change must save (share of the level)
    gain: float = 0.3  # log(price) step: + gain * (1 - miss share) after a miss
    initial_price: float = 0.05
    min_price: float = 1e-4
    max_price: float = 1e15
    floor: float = 0.0  # no allocation below this (usage is never negative)
    level_half_life: float = 288.0  # steps: how fast the usage level (the unit of slack) follows usage

    def validate(self) -> str | None:
        if not 0.5 < self.target_coverage < 1:
            return f"target_coverage: must be in (0.5, 1), got {self.target_coverage}"
        if self.span < 1:
            return f"span: must be >= 1, got {self.span}"
        if self.change_cost < 0 or self.gain <= 0:
            return "change_cost must be >= 0 and gain > 0"
        return None


@dataclass(frozen=True)
class AllocationState:
    """What the caller keeps per series between cycles."""

    allocation: float | None = None  # the limit in force; None before the first decision
    log_price: float = math.log(AllocationPolicy.initial_price)
    # Mean usage (decaying): slack is priced relative to it, as the backtest scores slack relative to
    # total demand. None until the first decision, which starts it at the forecast median.
    level: float | None = None

    @classmethod
    def initial(cls, policy: AllocationPolicy) -> AllocationState:
        return cls(None, math.log(policy.initial_price))


class Move(IntEnum):
    FIRST = 0
    KEPT = 1
    RAISED = 2
    LOWERED = 3


@dataclass(frozen=True)
class Allocation:
    allocation: float
    quantile: float  # the curve level the limit corresponds to, on the step that needs the most
    miss_probability: float  # per served step, on average, at the new limit
    expected_slack: float  # per served step, on average, in the series' units
    move: Move
    reason: str
    state: AllocationState


@dataclass(frozen=True)
class BatchAllocation:
    allocation: F64
    quantile: F64
    miss_probability: F64
    expected_slack: F64
    move: npt.NDArray[np.int64]
    saving: F64  # expected cost saved per served step by the move (0 when kept)
    level: F64  # the level used (the caller keeps it when it started from the curve)


def _interp_matrix(quantiles: tuple[float, ...]) -> F64:
    """(grid, Q) weights: curve values at the grid levels from values at the model's quantiles."""
    xq = np.log(np.asarray(quantiles) / (1 - np.asarray(quantiles)))
    xt = np.log(_TAU / (1 - _TAU))
    m = np.zeros((len(_TAU), len(quantiles)))
    if len(quantiles) == 1:
        m[:, 0] = 1.0
        return m
    i = np.clip(np.searchsorted(xq, xt) - 1, 0, len(xq) - 2)
    f = (xt - xq[i]) / (xq[i + 1] - xq[i])
    m[np.arange(len(_TAU)), i] = 1 - f
    m[np.arange(len(_TAU)), i + 1] = f
    return m


def _at(x: F64, y: F64, vals: F64) -> F64:
    """Row-wise linear interpolation of vals (N, S, G) at x (N,) on increasing grids y (N, S, G)."""
    g = y.shape[-1]
    j = np.clip((y <= x[:, None, None]).sum(axis=-1), 1, g - 1)[..., None]
    y0, y1 = np.take_along_axis(y, j - 1, -1)[..., 0], np.take_along_axis(y, j, -1)[..., 0]
    v0, v1 = np.take_along_axis(vals, j - 1, -1)[..., 0], np.take_along_axis(vals, j, -1)[..., 0]
    f = np.clip((x[:, None] - y0) / np.where(y1 > y0, y1 - y0, 1.0), 0.0, 1.0)
    return np.asarray(v0 + (v1 - v0) * f)


def _costs(x: F64, y: F64, slack: F64, level: F64, price: F64) -> tuple[F64, F64, F64]:
    """Expected slack, miss probability and cost per served step at allocation x: each (N, S)."""
    top, bottom = y[..., -1], y[..., 0]
    xs = x[:, None]
    es = _at(x, y, slack)
    es = np.where(xs >= top, slack[..., -1] + (xs - top), np.where(xs <= bottom, 0.0, es))
    miss = 1.0 - _at(x, y, np.broadcast_to(_TAU, y.shape))
    miss = np.where(xs >= top, 0.0, np.where(xs < bottom, 1.0, miss))
    return es, miss, es / level[:, None] + price[:, None] * miss


def allocate_batch(
    curves: F64,
    quantiles: tuple[float, ...],
    current: F64,
    log_price: F64,
    level: F64,
    policy: AllocationPolicy = AllocationPolicy(),
    first_step: int = 0,
) -> BatchAllocation:
    """Vectorised `allocate` for N series: curves (N, horizon, Q); current (N,) with NaN for "no limit
    yet"; level (N,) the series' mean usage, NaN to start it from the curve's median."""
    curves = np.asarray(curves, dtype=np.float64)
    n, horizon, _ = curves.shape
    if not 0 <= first_step < horizon:
        raise ValueError(f"first_step {first_step} is outside the forecast horizon of {horizon} steps")
    served = curves[:, first_step : min(horizon, first_step + policy.span), :]
    y = np.maximum.accumulate(served @ _interp_matrix(quantiles).T, axis=-1)  # (N, S, G)
    slack = y * _CUM_MASS - np.cumsum(_MASS * y, axis=-1)  # E[(y_g - usage)+] at each grid level
    q = np.asarray(quantiles)
    med = np.abs(served[..., int(np.argmin(np.abs(q - 0.5)))]).mean(axis=1)
    level = np.where(np.isnan(level), med, level)
    # Floor: a series idle so far (level 0) still needs a finite unit.
    level = np.maximum(level, np.maximum(1e-6 * np.abs(served).max(axis=(1, 2)), 1e-12))
    price = np.exp(np.clip(log_price, math.log(policy.min_price), math.log(policy.max_price)))

    cost = slack / level[:, None, None] + price[:, None, None] * (1 - _TAU)
    best_g = np.argmin(cost, axis=-1)  # (N, S)
    best = np.take_along_axis(y, best_g[..., None], -1)[..., 0]
    s_star = np.argmax(best, axis=1)
    target = np.maximum(best[np.arange(n), s_star], policy.floor)
    tau = _TAU[best_g[np.arange(n), s_star]]

    _, _, c_new = _costs(target, y, slack, level, price)
    has = ~np.isnan(current)
    cur = np.where(has, current, target)
    _, _, c_cur = _costs(cur, y, slack, level, price)
    saving = c_cur.mean(axis=1) - c_new.mean(axis=1)
    move_now = ~has | (saving > policy.change_cost)
    alloc = np.where(move_now, target, cur)
    es, miss, _ = _costs(alloc, y, slack, level, price)
    moves = np.where(
        ~has, Move.FIRST, np.where(~move_now, Move.KEPT, np.where(target > cur, Move.RAISED, Move.LOWERED))
    ).astype(np.int64)
    return BatchAllocation(
        allocation=alloc,
        quantile=np.where(move_now, tau, np.nan),
        miss_probability=miss.mean(axis=1),
        expected_slack=es.mean(axis=1),
        move=moves,
        saving=np.where(move_now & has, saving, 0.0),
        level=level,
    )


def allocate(
    curve: F64,
    quantiles: tuple[float, ...],
    state: AllocationState,
    policy: AllocationPolicy = AllocationPolicy(),
    first_step: int = 0,
) -> Allocation:
    """The limit for one series.

    curve: (horizon, Q) forecast quantiles, in the series' units, from the latest origin; `first_step` is
      the index of the first step the new limit will be in force for (lead - 1: 0 when it applies at the
      next step).
    quantiles: the levels of the curve's columns, increasing.
    state: from the previous call (or `AllocationState.initial(policy)`), with `observe` applied for every
      step whose usage has become known since.
    Returns the limit, why, and the state to pass next time.
    """
    cur = np.array([np.nan if state.allocation is None else state.allocation])
    lvl = np.array([np.nan if state.level is None else state.level])
    b = allocate_batch(
        np.asarray(curve, dtype=np.float64)[None],
        quantiles,
        cur,
        np.array([state.log_price]),
        lvl,
        policy,
        first_step,
    )
    a = float(b.allocation[0])
    move = Move(int(b.move[0]))
    miss = float(b.miss_probability[0])
    if move is Move.FIRST:
        reason = f"first limit: {a:.6g} (q{b.quantile[0]:.4g} of the curve)"
    elif move is Move.KEPT:
        reason = f"kept {a:.6g}: a change would save less than {policy.change_cost:g} of the level per step"
    else:
        verb = "raised" if move is Move.RAISED else "lowered"
        reason = (
            f"{verb} to {a:.6g} (q{b.quantile[0]:.4g}): saves {b.saving[0]:.3g} of the level per step, "
            f"miss risk now {miss:.2%}"
        )
    return Allocation(
        allocation=a,
        quantile=float(b.quantile[0]),
        miss_probability=miss,
        expected_slack=float(b.expected_slack[0]),
        move=move,
        reason=reason,
        state=replace(state, allocation=a, level=float(b.level[0])),
    )


def observe(
    state: AllocationState,
    usage: float,
    policy: AllocationPolicy = AllocationPolicy(),
    allocation: float | None = None,
) -> AllocationState:
    """After a step's usage is known, re-price misses: a miss raises log(price) by gain*(1-alpha), a
    covered step lowers it by gain*alpha, so the price settles where the miss share is alpha = 1 - target.
    `allocation` is the limit that was in force for that step (default: the one in force now, which is
    the same unless decisions run ahead of observations)."""
    a = state.allocation if allocation is None else allocation
    if a is None:
        return state
    alpha = 1 - policy.target_coverage
    lp = state.log_price + policy.gain * ((1.0 if usage > a else 0.0) - alpha)
    lp = min(max(lp, math.log(policy.min_price)), math.log(policy.max_price))
    keep = 0.5 ** (1 / policy.level_half_life)
    level = abs(usage) if state.level is None else keep * state.level + (1 - keep) * abs(usage)
    return replace(state, log_price=lp, level=level)


def observe_batch(
    allocation: F64, log_price: F64, level: F64, usage: F64, policy: AllocationPolicy = AllocationPolicy()
) -> tuple[F64, F64]:
    """`observe` for N series at once: the new (log prices, levels); rows with NaN allocation (no limit
    of ours yet) are unchanged."""
    alpha = 1 - policy.target_coverage
    missed = (usage > allocation).astype(np.float64)
    none = np.isnan(allocation)
    lp = np.where(none, log_price, log_price + policy.gain * (missed - alpha))
    keep = 0.5 ** (1 / policy.level_half_life)
    new_level = np.where(np.isnan(level), np.abs(usage), keep * level + (1 - keep) * np.abs(usage))
    return (
        np.asarray(np.clip(lp, math.log(policy.min_price), math.log(policy.max_price))),
        np.asarray(np.where(none, level, new_level)),
    )
