"""What one scaling cycle decides for one resource of one shadow, and what the shadow's kernel then reports.

Plain frozen data: the planner makes decisions, the loop fills in how applying them went (`replace`), the
store keeps them, and the Fleet API turns them into its messages (controller/fleet_messages.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Readiness:
    """Whether a shadow's limits are in place, and why not."""

    ready: bool
    reason: str
