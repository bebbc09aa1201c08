"""One scaling step's plan, as pure functions: forecast curve + the limit in force -> decision.

This is the one path: the scaling loop calls it once per forecast step for every shadow resource, and
`shadowctl backtest` replays a trace through the very same calls (training/backtest.py), so the figures
the backtest prints are the controller's.

1. `forecast_target`: the curve forecast from the last complete step becomes a *target* through the
   allocation policy (a calibrated, priced choice of quantile over the next steps), calibrated against the
   limit that was really in force during that step; never below the forecast's median.
2. `decide_resource`: the seed rule moves the shadow's limit towards that target, within the floor, the
   ceiling (never above the host), for memory the memory in use plus a guard and a slow way down, and any
   operator override (pin, bound, freeze).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from controller.config import ScalingConfig
from controller.predict.allocation import AllocationPolicy, AllocationState, allocate, observe
from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.scaling.rule import Bounds, clamp, seed_rule

RESOURCES = ("cpu", "memory")
DAY_SECONDS = 86400.0
IO_REFERENCE_BYTES_PER_SECOND = 50 * 2**20  # I/O weight 100 (the kernel's default) at this predicted rate
SHOWN_QUANTILES = (0.5, 0.9, 0.99)
# A change smaller than this is not made (the kernel would not notice it, and every write is a limit change
# the backtest counts): 1 % of a core, 1 MiB of memory.
TOLERANCE = {"cpu": 0.01, "memory": float(2**20)}


@dataclass(frozen=True)
class Target:
    """What the forecast says one resource of a service's demand needs."""

    predicted: float
    forecast: dict[str, float]  # quantiles and the target, for the record
    source: str


@dataclass(frozen=True)
class ShadowNow:
    """A shadow workload as the kernel last reported it."""

    service: str
    host: str
    workload: str
    cpu_cores: float  # 0 = no limit
    memory_bytes: int  # 0 = no limit
    memory_in_use: int
    host_cpu_cores: float
    host_memory_bytes: int


def forecast_target(
    curve: npt.NDArray[np.float64],
    quantiles: tuple[float, ...],
    state: AllocationState,
    last_usage: float,
    in_force: float,
    policy: AllocationPolicy,
    first_step: int = 0,
) -> tuple[float, dict[str, float], AllocationState]:
    """One shadow resource's target for the next step, from the curve forecast at the last complete step.

    last_usage: the demand of that step (NaN if unknown); in_force: the limit that was in force during it
    (0: none). The miss price learns from that pair first, so calibration is on the limit the shadow really
    had, whatever the rule, bounds or overrides made of the policy's pick. Returns (target, the quantiles
    and target for the record, the state to pass next step)."""
    if in_force > 0 and not math.isnan(last_usage):
        state = observe(state, last_usage, policy, allocation=in_force)
    # Slack is priced against the forecast's own median (level None), not a slow running mean of usage: after
    # a step in demand the running mean lags for hours and would make raising look too dear.
    a = allocate(
        curve,
        quantiles,
        replace(state, allocation=in_force if in_force > 0 else None, level=None),
        policy,
        first_step,
    )
    row = np.asarray(curve[first_step])
    shown = {f"q{q:g}": float(row[quantiles.index(q)]) for q in SHOWN_QUANTILES if q in quantiles}
    # The priced policy may keep a low limit until misses have raised its price; a shadow that must be
    # ready is never sized below what the forecast itself expects next.
    median_next = float(np.interp(0.5, quantiles, row))
    target = max(a.allocation, median_next)
    shown["target"] = target
    if not math.isnan(a.quantile):
        shown["target_quantile"] = a.quantile if target == a.allocation else 0.5
    return target, shown, replace(state, allocation=a.allocation)


@dataclass(frozen=True)
class Sizing:
    """Whether a shadow is sized to its service's forecast (warm) or held at the floor, and why."""

    warm: bool
    reason: str


def tier_sizing(tier: str, serving: bool, primary_zone_degraded: str) -> Sizing:
    """How a service's tier sizes one of its shadows (docs/pool.md). dedicated and shared: to the forecast
    all along. cold: at the floor (what the pool's reserve on a shared host is for: room that other work
    uses until a failure needs it) until it is `serving` the service (or taking it over), or its primary's
    zone is degraded (`primary_zone_degraded`: why; "" while it is not): then to the forecast at once,
    before the failure that degradation announces."""
    if tier != "cold":
        return Sizing(True, f"tier {tier}: sized to the forecast")
    if serving:
        return Sizing(True, "cold tier, serving the service: sized to the forecast")
    if primary_zone_degraded:
        return Sizing(
            True, f"cold tier, pre-warmed: the primary's zone is degraded ({primary_zone_degraded})"
        )
    return Sizing(False, "cold tier: held at the floor until it takes over")


def bounds(cfg: ScalingConfig, resource: str, s: ShadowNow, last_demand: float = math.nan) -> Bounds:
    if resource == "cpu":
        cap = s.host_cpu_cores or float("inf")
        ceiling = min(cfg.cpu_ceiling_cores, cap) if cfg.cpu_ceiling_cores else cap
        return Bounds(cfg.cpu_floor_cores, ceiling)
    cap_m = float(s.host_memory_bytes or float("inf"))
    ceiling = min(float(cfg.memory_ceiling_bytes), cap_m) if cfg.memory_ceiling_bytes else cap_m
    # The guard: the memory in use (the shadow's own, or what the demand held in its last step, which a
    # takeover brings along) plus a margin, up to the ceiling; what the shadow holds is a hard floor even
    # above the ceiling (a lower limit makes the kernel reclaim or OOM-kill).
    used = max(float(s.memory_in_use), 0.0 if math.isnan(last_demand) else last_demand)
    guarded = max(float(s.memory_in_use), min(used * (1 + cfg.memory_guard), ceiling))
    return Bounds(float(cfg.memory_floor_bytes), ceiling, guarded)


def decide_resource(
    cfg: ScalingConfig,
    s: ShadowNow,
    resource: str,
    demand_from: str,
    target: Target,
    override: Override | None,
    now_ms: int,
    last_demand: float = math.nan,
    due: bool = True,
    since_change_s: float = math.inf,
    changes_in_day: int = 0,
) -> ScalingDecision:
    """The limit for one shadow resource. `due`: a new forecast step has begun (the rule moves the limit
    once per step; between steps only bounds and overrides act). `last_demand`: the demand's last complete
    step, for memory's guard. `since_change_s`: seconds since this limit last changed; a limit is lowered
    only once `lower_hold_seconds` have passed. `changes_in_day`: how often it changed in the last day; it is
    lowered only while that leaves room for a raise within `max_changes_per_day` (`budget_spent`). Raises
    are never held back."""
    current = s.cpu_cores if resource == "cpu" else float(s.memory_bytes)
    d = ScalingDecision(
        unix_ms=now_ms,
        service=s.service,
        host=s.host,
        workload=s.workload,
        resource=resource,
        demand_from=demand_from,
        forecast=target.forecast,
        predicted=target.predicted,
        old=current,
        new=current,
        branch="hold",
        forecast_source=target.source,
    )
    b = bounds(cfg, resource, s, last_demand)
    if override is not None and override.kind == "freeze":
        return replace(d, branch="frozen")
    if override is not None and override.kind == "pin":
        pinned = override.cpu_cores if resource == "cpu" else float(override.memory_bytes)
        if pinned:
            pinned_value, pinned_clamps = clamp(pinned, Bounds(0.0, b.ceiling, b.in_use))
            return replace(d, new=pinned_value, branch="pinned", clamps=", ".join(pinned_clamps))
    if not due and not current:
        return d  # no limit yet: the first one is set at a step
    value, branch = seed_rule(target.predicted, current, cfg.rule_params()) if due else (current, "hold")
    held_down = branch == "remove" and since_change_s < cfg.lower_hold_seconds
    spent = branch == "remove" and not held_down and budget_spent(cfg, changes_in_day)
    if held_down or spent:
        value, branch = current, "hold"
    if resource == "memory" and current and value < current * (1 - cfg.memory_lower_step):
        value = current * (1 - cfg.memory_lower_step)  # down slowly: an OOM kill is worse than slack
    value, clamped = clamp(value, b)
    clamps: list[str] = [
        *clamped,
        *(["lower hold"] if held_down else []),
        *(["change budget"] if spent else []),
    ]
    if override is not None and override.kind == "bound":
        lo = override.cpu_min if resource == "cpu" else float(override.memory_min)
        hi = override.cpu_max if resource == "cpu" else float(override.memory_max)
        if lo and value < lo:
            value, clamps = lo, [*clamps, "bound"]
        if hi and value > hi:
            value, clamps = max(hi, b.in_use), [*clamps, "bound"]
    if current and abs(value - current) < TOLERANCE[resource]:
        value = current
    return replace(d, new=value, branch=branch, clamps=", ".join(clamps))


def budget_spent(cfg: ScalingConfig, changes_in_day: int) -> bool:
    """May a limit that changed `changes_in_day` times in the last day not be lowered now? A lowering is a
    change, and the day's last change is kept for a raise (demand the limit must follow), so lowering stops
    one change short of the budget."""
    return cfg.max_changes_per_day > 0 and changes_in_day >= cfg.max_changes_per_day - 1


def recent_changes(changes: tuple[float, ...], now_s: float, compression: float = 1.0) -> tuple[float, ...]:
    """The changes (their forecast steps, in seconds) less than a day of the model's time before `now_s`:
    what the budget counts. `compression`: model seconds per second (a lab that compresses time)."""
    return tuple(t for t in changes if (now_s - t) * compression < DAY_SECONDS)


def io_weight(predicted_bytes_per_second: float) -> int:
    """The cgroup I/O weight (10..1000, default 100) for a predicted I/O rate: proportional, so a shadow
    expected to do more I/O than the reference gets a larger share of the disk when it contends."""
    return max(10, min(1000, round(100 * predicted_bytes_per_second / IO_REFERENCE_BYTES_PER_SECOND)))
