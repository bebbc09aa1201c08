"""What one scaling cycle decides for one resource of one shadow, and what the shadow's kernel then reports.

Plain frozen data: the planner makes decisions, the loop fills in how applying them went (`replace`), the
store keeps them, and the Fleet API turns them into its messages (controller/fleet_messages.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shadowplane.v1 import telemetry_pb2 as tpb


@dataclass(frozen=True)
class ScalingDecision:
    unix_ms: int
    service: str
    host: str  # the shadow host
    workload: str
    resource: str  # "cpu" (cores) or "memory" (bytes)
    demand_from: str  # the workload whose forecast drives it, "host/workload"
    forecast: Mapping[str, float]  # the quantiles used ("q0.5", "q0.99", ...) and the "target"
    predicted: float  # the target the rule compares with the allocation
    old: float  # allocation before
    new: float  # what the rule (and bounds, overrides) chose
    branch: str  # add, remove, hold, first, pinned, frozen
    clamps: str = ""  # e.g. "floor", "ceiling", "in use", "bound"
    forecast_source: str = ""  # model or fallback (and why)
    result: str = "planned"  # planned, applied, unchanged, failed: ...
    applied: float = 0.0  # what the kernel reports afterwards
    id: int = 0  # the store's; 0 until stored

    @property
    def changed(self) -> bool:
        """Worth sending: a change the kernel would notice (1 % of a core, 1 MiB of memory)."""
        tolerance = 0.01 if self.resource == "cpu" else float(2**20)
        return abs(self.new - self.old) >= tolerance


@dataclass(frozen=True)
class AppliedLimits:
    """A shadow workload's limits as its agent read them back from the kernel after applying them."""

    cpu_cores: float  # 0: no limit
    memory_bytes: int  # 0: no limit
    io_weight: int = 0
    memory_in_use_bytes: int = 0
    at_ms: int = 0  # when the controller heard the read-back


@dataclass(frozen=True)
class Readiness:
    """Whether a shadow's limits are in place, and why not."""

    ready: bool
    reason: str


IN_PLACE = Readiness(True, "limits in place")
CPU_TOLERANCE_CORES = 1e-6  # quota / period as a float: the same files give the same number


def held(applied: AppliedLimits, newest: tpb.WorkloadSample | None) -> Readiness:
    """Whether the kernel still holds the applied limits, by the newest sample of the shadow: each carries the
    limits its agent read from the kernel that interval (after writing again any that were reset). A sample
    from before the limits were applied says nothing of them: the apply's own read-back is the newest word."""
    if newest is None or newest.end_unix_ms <= applied.at_ms:
        return IN_PLACE
    r = newest.resources
    if r.limits_problem:
        return Readiness(False, f"the kernel does not hold the limits: {r.limits_problem}")
    off = []
    if abs(r.cpu_limit_cores - applied.cpu_cores) > CPU_TOLERANCE_CORES:
        off.append(f"cpu {r.cpu_limit_cores:g} cores (applied {applied.cpu_cores:g})")
    if r.memory_limit_bytes != applied.memory_bytes:
        off.append(f"memory {r.memory_limit_bytes or 'max'} bytes (applied {applied.memory_bytes or 'max'})")
    if off:
        return Readiness(False, "the kernel no longer holds the applied limits: " + ", ".join(off))
    return IN_PLACE
