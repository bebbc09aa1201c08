from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ScalingConfig
from controller.scaling.override import Override
from controller.scaling.planner import (
    ShadowNow,
    Sizing,
    Target,
    decide_resource,
    io_weight,
    recent_changes,
    tier_sizing,
)
from controller.store import SqliteStore

CFG = ScalingConfig(cpu_floor_cores=0.1, memory_floor_bytes=64 * 2**20)
GIB = 2**30


def shadow(
    cpu: float = 1.0, mem: int = GIB, in_use: int = 0, host_cpu: float = 4, host_mem: int = 8 * GIB
) -> ShadowNow:
    return ShadowNow("web", "s1", "web", cpu, mem, in_use, host_cpu, host_mem)


def target(v: float) -> Target:
    return Target(v, {"q0.5": v / 2, "target": v}, "model")


def test_rule_branches_are_recorded_with_the_forecast() -> None:
    d = decide_resource(CFG, shadow(cpu=1.0), "cpu", "p1/web", target(2.0), None, 1000)
    assert (d.old, d.new, d.branch, d.predicted) == (1.0, 2.5, "add", 2.0)
    assert d.forecast["target"] == 2.0 and d.demand_from == "p1/web" and d.result == "planned"
    d = decide_resource(CFG, shadow(cpu=1.0), "cpu", "p1/web", target(1.1), None, 1000)
    assert d.branch == "hold" and not d.changed


def test_ceiling_is_the_host_capacity_and_memory_keeps_what_is_used() -> None:
    d = decide_resource(CFG, shadow(cpu=3.0, host_cpu=4), "cpu", "p1/web", target(9.0), None, 0)
    assert d.new == 4.0 and "ceiling" in d.clamps
    d = decide_resource(CFG, shadow(cpu=0.15), "cpu", "p1/web", target(0.0), None, 0)
    assert d.new == pytest.approx(0.1) and "floor" in d.clamps


MEM = ScalingConfig(memory_guard=0.2, memory_lower_step=0.1, memory_floor_bytes=0)


def test_memory_never_goes_below_what_is_in_use_plus_the_guard() -> None:
    # the rule would halve the gap to 0.5 GiB and the slow way down allows 7.2 GiB: the guard holds 3.6
    d = decide_resource(
        MEM, shadow(mem=8 * GIB, in_use=3 * GIB, host_mem=16 * GIB), "memory", "p/w", target(GIB / 2), None, 0
    )
    assert d.branch == "remove" and d.new == pytest.approx(7.2 * GIB)
    d = decide_resource(
        MEM,
        shadow(mem=int(3.8 * GIB), in_use=3 * GIB, host_mem=16 * GIB),
        "memory",
        "p/w",
        target(GIB / 2),
        None,
        0,
    )
    assert d.new == pytest.approx(3.6 * GIB) and "in use" in d.clamps
    # what the demand held in its last step counts like the shadow's own use (a takeover brings it along)
    d = decide_resource(
        MEM,
        shadow(mem=int(3.8 * GIB), in_use=0, host_mem=16 * GIB),
        "memory",
        "p/w",
        target(GIB / 2),
        None,
        0,
        last_demand=3 * GIB,
    )
    assert d.new == pytest.approx(3.6 * GIB) and "in use" in d.clamps
    # the guard stops at the ceiling; what the cgroup holds does not
    d = decide_resource(
        MEM,
        shadow(mem=4 * GIB, in_use=int(3.5 * GIB), host_mem=4 * GIB),
        "memory",
        "p/w",
        target(GIB / 2),
        None,
        0,
    )
    assert d.new == pytest.approx(4 * GIB)
    d = decide_resource(
        MEM, shadow(mem=6 * GIB, in_use=5 * GIB, host_mem=4 * GIB), "memory", "p/w", target(GIB / 2), None, 0
    )
    assert d.new == pytest.approx(5 * GIB) and "in use" in d.clamps


def test_memory_comes_down_slowly_and_goes_up_at_once() -> None:
    d = decide_resource(MEM, shadow(mem=10 * GIB, host_mem=64 * GIB), "memory", "p/w", target(GIB), None, 0)
    assert d.branch == "remove" and d.new == pytest.approx(9 * GIB)
    d = decide_resource(MEM, shadow(mem=GIB, host_mem=64 * GIB), "memory", "p/w", target(10 * GIB), None, 0)
    assert d.branch == "add" and d.new == pytest.approx(14.5 * GIB)
    # CPU has no such brake: throttling is not a kill
    d = decide_resource(MEM, shadow(cpu=4.0), "cpu", "p/w", target(1.0), None, 0)
    assert d.new == pytest.approx(2.5)


def test_the_rule_moves_a_limit_once_per_forecast_step() -> None:
    d = decide_resource(CFG, shadow(cpu=1.0), "cpu", "p/w", target(2.0), None, 0, due=False)
    assert d.branch == "hold" and d.new == 1.0
    # between steps the bounds still act: memory the shadow took since is guarded at once
    d = decide_resource(
        MEM,
        shadow(mem=GIB, in_use=2 * GIB, host_mem=8 * GIB),
        "memory",
        "p/w",
        target(GIB),
        None,
        0,
        due=False,
    )
    assert d.new == pytest.approx(2.4 * GIB) and "in use" in d.clamps
    # a shadow with no limit yet gets its first one at a step, not between
    d = decide_resource(CFG, shadow(cpu=0.0), "cpu", "p/w", target(2.0), None, 0, due=False)
    assert d.new == 0.0 and not d.changed


def test_the_change_budget_keeps_the_day_s_last_change_for_a_raise() -> None:
    """Budget 7 (the default): with 5 changes in the last day a limit may still come down (the 6th),
    with 6 it holds (the 7th is kept for a raise), and a raise is never held, however many there were."""
    assert CFG.max_changes_per_day == 7
    d = decide_resource(CFG, shadow(cpu=2.0), "cpu", "p/w", target(0.5), None, 0, changes_in_day=5)
    assert d.branch == "remove" and d.new < 2.0
    d = decide_resource(CFG, shadow(cpu=2.0), "cpu", "p/w", target(0.5), None, 0, changes_in_day=6)
    assert (d.branch, d.new) == ("hold", 2.0) and "change budget" in d.clamps
    d = decide_resource(CFG, shadow(cpu=1.0), "cpu", "p/w", target(2.0), None, 0, changes_in_day=40)
    assert d.branch == "add" and d.new == 2.5
    off = ScalingConfig(cpu_floor_cores=0.1, max_changes_per_day=0)
    d = decide_resource(off, shadow(cpu=2.0), "cpu", "p/w", target(0.5), None, 0, changes_in_day=40)
    assert d.branch == "remove"
    # the lower hold says first why a limit stays
    d = decide_resource(CFG, shadow(cpu=2.0), "cpu", "p/w", target(0.5), None, 0, since_change_s=60.0,
                        changes_in_day=6)  # fmt: skip
    assert d.clamps == "lower hold"


def test_the_budget_counts_the_changes_of_the_last_day_in_the_model_s_time() -> None:
    day = 86400.0
    assert recent_changes((0.0, 10.0, day - 1, day + 5), day + 5) == (10.0, day - 1, day + 5)
    # a lab compressing 300 model seconds into 1: a model day is 288 seconds
    assert recent_changes((0.0, 100.0, 287.0), 288.0, compression=300.0) == (100.0, 287.0)


def test_a_change_the_kernel_would_not_notice_is_not_made() -> None:
    # the rule would halve 0.105 towards 0, the floor makes it 0.1: 0.005 cores is not worth a write
    d = decide_resource(CFG, shadow(cpu=0.105), "cpu", "p/w", target(0.0), None, 0)
    assert d.new == 0.105 and not d.changed


def test_overrides_pin_bound_freeze() -> None:
    pin = Override("s1", "web", "pin", cpu_cores=0.5)
    d = decide_resource(CFG, shadow(cpu=2.0), "cpu", "p1/web", target(3.0), pin, 0)
    assert (d.new, d.branch) == (0.5, "pinned")
    # a pin without a memory value leaves memory to the forecast
    d = decide_resource(CFG, shadow(mem=GIB), "memory", "p1/web", target(2 * GIB), pin, 0)
    assert d.branch == "add"
    freeze = Override("s1", "web", "freeze")
    d = decide_resource(CFG, shadow(cpu=1.0), "cpu", "p1/web", target(3.0), freeze, 0)
    assert (d.new, d.branch) == (1.0, "frozen")
    bound = Override("s1", "web", "bound", cpu_min=0.5, cpu_max=1.5)
    d = decide_resource(CFG, shadow(cpu=1.0), "cpu", "p1/web", target(3.0), bound, 0)
    assert d.new == 1.5 and "bound" in d.clamps


def test_io_weight_is_proportional_and_bounded() -> None:
    assert io_weight(0) == 10 and io_weight(50 * 2**20) == 100 and io_weight(10**12) == 1000


def test_store_keeps_decisions_and_overrides(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "c.db")
    ds = [
        decide_resource(CFG, shadow(cpu=c), "cpu", "p1/web", target(2.0), None, i)
        for i, c in enumerate([1, 2, 3])
    ]
    stored = st.add_decisions(ds)
    assert [d.id for d in stored] == [1, 2, 3]
    assert [d.old for d in st.decisions(host="s1", last=2)] == [2.0, 3.0]
    st.set_override(Override("s1", "web", "freeze", by="alice"))
    assert st.overrides()[("s1", "web")].by == "alice"
    st.set_override(Override("s1", "web", "clear"))
    assert st.overrides() == {}


def test_a_cold_shadow_is_warm_only_while_serving_or_its_primarys_zone_is_degraded() -> None:
    base = {"tier": "cold", "serving": False, "primary_zone_degraded": ""}
    assert tier_sizing(**base) == Sizing(False, "cold tier: held at the floor until it takes over")
    assert tier_sizing(**{**base, "serving": True}).warm
    warm = tier_sizing(**{**base, "primary_zone_degraded": "az1: 2 of 3 hosts down"})
    assert warm.warm and "pre-warmed" in warm.reason and "az1: 2 of 3 hosts down" in warm.reason
    for tier in ("shared", "dedicated"):
        assert tier_sizing(**{**base, "tier": tier}) == Sizing(True, f"tier {tier}: sized to the forecast")
