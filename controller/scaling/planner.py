"""One scaling cycle's plan, as pure functions: forecast target + current allocation -> decision.

The forecast's quantile curve becomes a *target* through the prediction engine's allocation policy (a
calibrated, priced choice of quantile over the next steps); the seed rule then moves each shadow's
allocation towards that target, within the floor, the ceiling (never above the host), the memory the
cgroup uses now, and any operator override (pin, bound, freeze).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from controller.config import ScalingConfig
from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.scaling.rule import Bounds, clamp, step

RESOURCES = ("cpu", "memory")
IO_REFERENCE_BYTES_PER_SECOND = 50 * 2**20  # I/O weight 100 (the kernel's default) at this predicted rate


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


def bounds(cfg: ScalingConfig, resource: str, s: ShadowNow) -> Bounds:
    if resource == "cpu":
        cap = s.host_cpu_cores or float("inf")
        ceiling = min(cfg.cpu_ceiling_cores, cap) if cfg.cpu_ceiling_cores else cap
        return Bounds(cfg.cpu_floor_cores, ceiling)
    cap_m = float(s.host_memory_bytes or float("inf"))
    ceiling = min(float(cfg.memory_ceiling_bytes), cap_m) if cfg.memory_ceiling_bytes else cap_m
    return Bounds(float(cfg.memory_floor_bytes), ceiling, float(s.memory_in_use))


def decide_resource(
    cfg: ScalingConfig,
    s: ShadowNow,
    resource: str,
    demand_from: str,
    target: Target,
    override: Override | None,
    now_ms: int,
) -> ScalingDecision:
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
    b = bounds(cfg, resource, s)
    if override is not None and override.kind == "freeze":
        return replace(d, branch="frozen")
    if override is not None and override.kind == "pin":
        pinned = override.cpu_cores if resource == "cpu" else float(override.memory_bytes)
        if pinned:
            pinned_value, pinned_clamps = clamp(pinned, Bounds(0.0, b.ceiling, b.in_use))
            return replace(d, new=pinned_value, branch="pinned", clamps=", ".join(pinned_clamps))
    st = step(target.predicted, current, cfg.rule_params(), b)
    value = st.value
    clamps: list[str] = [*st.clamps]
    if override is not None and override.kind == "bound":
        lo = override.cpu_min if resource == "cpu" else float(override.memory_min)
        hi = override.cpu_max if resource == "cpu" else float(override.memory_max)
        if lo and value < lo:
            value, clamps = lo, [*clamps, "bound"]
        if hi and value > hi:
            value, clamps = max(hi, b.in_use), [*clamps, "bound"]
    return replace(d, new=value, branch=st.branch, clamps=", ".join(clamps))


def io_weight(predicted_bytes_per_second: float) -> int:
    """The cgroup I/O weight (10..1000, default 100) for a predicted I/O rate: proportional, so a shadow
    expected to do more I/O than the reference gets a larger share of the disk when it contends."""
    return max(10, min(1000, round(100 * predicted_bytes_per_second / IO_REFERENCE_BYTES_PER_SECOND)))
