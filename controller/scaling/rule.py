"""The seed's scaling rule and its bounds, as pure functions.

    predicted > allocation x up_threshold   -> add    (predicted - allocation) x up_factor
    predicted < allocation x down_threshold -> remove (allocation - predicted) x down_factor
    otherwise                               -> hold

then clamp to [floor, ceiling] (the ceiling never above the host's capacity), and for memory never below
what the cgroup uses now (the kernel would reclaim or OOM-kill to meet a lower limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Branch = Literal["add", "remove", "hold", "first"]


@dataclass(frozen=True)
class RuleParams:
    up_threshold: float = 1.2
    up_factor: float = 1.5
    down_threshold: float = 0.8
    down_factor: float = 0.5


DEFAULT_RULE = RuleParams()


@dataclass(frozen=True)
class Bounds:
    floor: float
    ceiling: float  # already min(configured ceiling, host capacity)
    in_use: float = 0.0  # memory: what the cgroup holds now


@dataclass(frozen=True)
class Step:
    value: float
    branch: Branch
    clamps: tuple[str, ...]  # which bound(s) changed the rule's value, e.g. ("floor",)

    def describe(self, unit: str) -> str:
        text = {
            "add": "above the up threshold -> add",
            "remove": "below the down threshold -> remove",
            "hold": "within the band -> hold",
            "first": "no limit yet -> add",
        }[self.branch]
        out = f"{text}: {self.value:.3f} {unit}"
        return out + (f" (clamped: {', '.join(self.clamps)})" if self.clamps else "")


def seed_rule(predicted: float, allocation: float, p: RuleParams) -> tuple[float, Branch]:
    """The rule alone. An allocation of 0 (no limit yet) grows from nothing like any shortfall."""
    if allocation <= 0:
        return predicted * p.up_factor, "first"
    if predicted > allocation * p.up_threshold:
        return allocation + (predicted - allocation) * p.up_factor, "add"
    if predicted < allocation * p.down_threshold:
        return allocation - (allocation - predicted) * p.down_factor, "remove"
    return allocation, "hold"


def clamp(value: float, b: Bounds) -> tuple[float, tuple[str, ...]]:
    clamps: list[str] = []
    if value < b.floor:
        value, clamps = b.floor, [*clamps, "floor"]
    if value > b.ceiling:
        value, clamps = b.ceiling, [*clamps, "ceiling"]
    if value < b.in_use:
        value, clamps = b.in_use, [*clamps, "in use"]
    return value, tuple(clamps)


def step(predicted: float, allocation: float, p: RuleParams, b: Bounds) -> Step:
    value, branch = seed_rule(predicted, allocation, p)
    value, clamps = clamp(value, b)
    return Step(value, branch, clamps)
