"""The pool's data: hosts with their zone, size and price; services with their tier and forecast demand; a
plan. Frozen, so that a plan can be compared with the one before it and handed across threads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# dedicated: a shadow host of its own, pre-warmed to the forecast (the 1:1 of keepalived pairs);
# shared: a shadow on a host that backs other services too, pre-warmed to the forecast;
# cold: shared, its limits raised only when it fails over.
# Placement treats shared and cold alike (both need room in every failure scenario that fails them); the
# scaling controller sizes a shared shadow's cgroups from the forecast all along, a cold one's at failover.
Tier = Literal["dedicated", "shared", "cold"]
TIERS: tuple[Tier, ...] = ("dedicated", "shared", "cold")


@dataclass(frozen=True)
class PoolHost:
    name: str
    zone: str  # "" : a zone of its own (its failure is only its own)
    cores: float
    memory_bytes: int
    price_per_hour: float
    perf_class: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # e.g. (("rack", "r12"),): for spread_by
    used_cores: float = 0.0  # the forecast demand of the primaries it runs: not available to reserve
    used_memory_bytes: int = 0
    usable: bool = True  # False: down, or in a degraded zone: no shadow may be placed here

    @property
    def failure_domain(self) -> str:
        return self.zone or f"host:{self.name}"

    def label(self, key: str) -> str | None:
        return next((v for k, v in self.labels if k == key), None)

    @property
    def free_cores(self) -> float:
        return max(0.0, self.cores - self.used_cores)

    @property
    def free_memory_bytes(self) -> int:
        return max(0, self.memory_bytes - self.used_memory_bytes)


@dataclass(frozen=True)
class PoolService:
    name: str
    primary: str
    cpu_cores: float  # forecast demand: the chosen quantile's peak over the horizon
    memory_bytes: int
    tier: Tier = "shared"
    spread_by: tuple[str, ...] = ()  # label keys (rack, ...) whose value the shadow must not share
    shadow_class: str = ""  # a perf_class the shadow must have ("" : any)
    pinned: str = ""  # an operator's explicit shadow: kept, and counted in every scenario


@dataclass(frozen=True)
class Move:
    service: str
    before: str  # "" : placed for the first time
    after: str  # "" : could not be placed
    reason: str


@dataclass(frozen=True)
class Reserve:
    host: str
    cores: float  # the most any single failure scenario lands on it
    memory_bytes: int
    price_per_hour: float  # its share of the host's price (the larger of its cores and memory shares)
    worst: str  # the scenario that needs that much, e.g. "zone b"
    dedicated: bool = False  # held whole for one dedicated service


@dataclass(frozen=True)
class Shortfall:
    scenario: str
    service: str
    why: str


@dataclass(frozen=True)
class Coverage:
    """What a placement covers, as coverage.check counts it."""

    host_scenarios: int
    host_covered: int
    zone_scenarios: int
    zone_covered: int
    shortfalls: tuple[Shortfall, ...]
    reserves: tuple[Reserve, ...]  # hosts that reserve anything, by name
    price_per_hour: float

    @property
    def all_covered(self) -> bool:
        return not self.shortfalls


@dataclass(frozen=True)
class Plan:
    shadows: tuple[tuple[str, str], ...]  # (service, shadow host), by service name
    coverage: Coverage  # of these shadows, counted by coverage.check
    moves: tuple[Move, ...]
    unplaced: tuple[tuple[str, str], ...] = ()  # (service, why)
    solver: str = ""  # what found it: "HiGHS optimal", "HiGHS gap 0.8 % (time limit)", ...
    solve_seconds: float = 0.0
    candidates: int = 0  # (service, host) pairs the solver chose among

    @property
    def reserves(self) -> tuple[Reserve, ...]:
        return self.coverage.reserves

    @property
    def price_per_hour(self) -> float:
        return self.coverage.price_per_hour

    def shadow_of(self, service: str) -> str | None:
        return next((h for s, h in self.shadows if s == service), None)

    def as_dict(self) -> dict[str, str]:
        return dict(self.shadows)
