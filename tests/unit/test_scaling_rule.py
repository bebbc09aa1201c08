from __future__ import annotations

import pytest

from controller.scaling.rule import Bounds, RuleParams, clamp, seed_rule, step

P = RuleParams()
WIDE = Bounds(floor=0.1, ceiling=100)


@pytest.mark.parametrize(
    ("predicted", "alloc", "want", "branch"),
    [
        (3.0, 2.0, 2.0 + 1.0 * 1.5, "add"),  # 3 > 2.4
        (2.4, 2.0, 2.0, "hold"),  # exactly x1.2 is not above
        (1.6, 2.0, 2.0, "hold"),  # exactly x0.8 is not below
        (1.0, 2.0, 2.0 - 1.0 * 0.5, "remove"),
        (2.0, 0.0, 3.0, "first"),
    ],
)
def test_seed_rule_branches(predicted: float, alloc: float, want: float, branch: str) -> None:
    assert seed_rule(predicted, alloc, P) == (pytest.approx(want), branch)


def test_floor_ceiling_and_memory_in_use() -> None:
    assert clamp(0.01, WIDE) == (0.1, ("floor",))
    assert clamp(500, WIDE) == (100, ("ceiling",))
    # memory never below what the cgroup uses now, even if the floor/ceiling say otherwise
    assert clamp(1.0, Bounds(floor=0.5, ceiling=4.0, in_use=3.0)) == (3.0, ("in use",))
    s = step(predicted=0.0, allocation=8.0, p=P, b=Bounds(floor=1.0, ceiling=16.0, in_use=6.0))
    assert (s.value, s.branch, s.clamps) == (6.0, "remove", ("in use",))
    assert "clamped: in use" in s.describe("GiB")


def test_custom_factors() -> None:
    p = RuleParams(up_threshold=1.1, up_factor=2.0, down_threshold=0.5, down_factor=1.0)
    assert seed_rule(1.2, 1.0, p) == (pytest.approx(1.4), "add")
    assert seed_rule(0.4, 1.0, p) == (pytest.approx(0.4), "remove")
