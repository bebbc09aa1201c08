"""The Resource Pool Manager's placement (controller/pool/placement.py), judged by the independent count of
failure scenarios (controller/pool/coverage.py): small fleets in 3 zones, one field varied at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.pool.alternatives import dedicated_twins, n_plus_one
from controller.pool.coverage import check
from controller.pool.model import PoolHost, PoolService
from controller.pool.placement import PlacementError, PlanOptions, plan

G = 2**30


def fleet(per_zone: int = 2, spare: bool = True) -> tuple[list[PoolHost], list[PoolService]]:
    """per_zone primaries in each of zones a, b, c (16 cores, 4 used by a 4-core service) and, with spare,
    one 32-core shadow host per zone, cheaper per core than the primaries."""
    hosts, services = [], []
    for z in "abc":
        for i in range(per_zone):
            hosts.append(PoolHost(f"{z}{i}", z, 16, 64 * G, 1.6, used_cores=4, used_memory_bytes=8 * G,
                                  labels=(("rack", f"{z}-r{i % 2}"),)))  # fmt: skip
            services.append(PoolService(f"svc-{z}{i}", f"{z}{i}", 4.0, 8 * G))
        if spare:
            hosts.append(PoolHost(f"{z}-spare", z, 32, 128 * G, 2.4, labels=(("rack", f"{z}-r0"),)))
    return hosts, services


def zone_of(hosts: list[PoolHost], name: str) -> str:
    return next(h.zone for h in hosts if h.name == name)


def test_every_single_host_and_zone_failure_finds_room_never_in_the_primarys_zone() -> None:
    hosts, services = fleet()
    p = plan(hosts, services)
    cov = check(hosts, services, p.as_dict())
    assert cov.all_covered, cov.shortfalls
    assert (cov.host_covered, cov.host_scenarios, cov.zone_covered, cov.zone_scenarios) == (6, 6, 3, 3)
    for s in services:
        shadow = p.shadow_of(s.name)
        assert shadow is not None and zone_of(hosts, shadow) != zone_of(hosts, s.primary)
    assert not p.unplaced and p.solver.startswith("HiGHS")


def test_one_shadow_host_backs_two_zones_with_the_larger_of_their_demands_not_the_sum() -> None:
    # zone a and zone b each fail alone, so c0 reserves for the larger of the two, not both
    hosts = [
        PoolHost("a0", "a", 16, 64 * G, 1.0, used_cores=6, used_memory_bytes=6 * G),
        PoolHost("b0", "b", 16, 64 * G, 1.0, used_cores=4, used_memory_bytes=4 * G),
        PoolHost("c0", "c", 16, 64 * G, 1.0),
    ]
    services = [PoolService("x", "a0", 6.0, 6 * G), PoolService("y", "b0", 4.0, 4 * G)]
    p = plan(hosts, services)
    assert p.as_dict() == {"x": "c0", "y": "c0"}
    reserve = {r.host: r for r in p.reserves}
    assert reserve["c0"].cores == pytest.approx(6.0) and reserve["c0"].worst in ("host a0", "zone a")
    assert p.price_per_hour == pytest.approx(6 / 16)


def test_the_cheaper_host_per_core_is_chosen_when_both_have_room() -> None:
    hosts, services = fleet(per_zone=1, spare=False)
    hosts += [PoolHost("c-cheap", "c", 16, 64 * G, 0.8), PoolHost("c-dear", "c", 16, 64 * G, 3.2)]
    p = plan(hosts, services)
    assert "c-dear" not in p.as_dict().values()
    assert "c-cheap" in p.as_dict().values()


def test_pool_is_cheaper_than_dedicated_twins_and_covers_what_n_plus_one_does_not() -> None:
    hosts, services = fleet(per_zone=4)
    p = plan(hosts, services)
    twins, naive = dedicated_twins(hosts, services), n_plus_one(hosts, services)
    assert p.price_per_hour < 0.5 * twins.price_per_hour
    assert (twins.zone_covered, twins.zone_scenarios) == (3, 3)
    assert (naive.host_covered, naive.host_scenarios, naive.zone_covered) == (12, 12, 0)


def test_an_unusable_host_gets_no_shadow() -> None:
    hosts, services = fleet()
    before = plan(hosts, services)
    used = sorted(set(before.as_dict().values()))
    down = used[0]
    hosts = [replace(h, usable=False) if h.name == down else h for h in hosts]
    after = plan(hosts, services, before.as_dict())
    assert down not in after.as_dict().values()
    moved = {m.service: m for m in after.moves}
    for s, h in before.shadows:
        if h == down:
            assert "not usable" in moved[s].reason, moved[s]
    assert check(hosts, services, after.as_dict()).all_covered


def test_spread_by_keeps_the_shadow_off_the_primarys_rack_label() -> None:
    hosts = [
        PoolHost("a0", "", 16, 64 * G, 1.0, used_cores=4, labels=(("rack", "r1"),)),
        PoolHost("b0", "", 16, 64 * G, 0.5, labels=(("rack", "r1"),)),  # cheaper, same rack
        PoolHost("c0", "", 16, 64 * G, 1.0, labels=(("rack", "r2"),)),
    ]
    s = PoolService("x", "a0", 4.0, G)
    assert plan(hosts, [s]).as_dict() == {"x": "b0"}
    assert plan(hosts, [replace(s, spread_by=("rack",))]).as_dict() == {"x": "c0"}


def test_shadow_class_and_pinned_shadows() -> None:
    hosts, services = fleet(per_zone=1)
    hosts = [replace(h, perf_class="fast") if h.name == "c-spare" else h for h in hosts]
    s = replace(services[0], shadow_class="fast")  # svc-a0
    p = plan(hosts, [s, *services[1:]])
    assert p.shadow_of("svc-a0") == "c-spare"
    pinned = replace(services[0], pinned="b0")
    p = plan(hosts, [pinned, *services[1:]])
    assert p.shadow_of("svc-a0") == "b0"


def test_a_dedicated_service_gets_a_host_of_its_own_at_its_whole_price() -> None:
    hosts, services = fleet(per_zone=1)
    ded = replace(services[0], tier="dedicated")
    p = plan(hosts, [ded, *services[1:]])
    home = p.shadow_of(ded.name)
    assert home is not None and home.endswith("-spare") and zone_of(hosts, home) != "a"
    assert [s for s, h in p.shadows if h == home] == [ded.name]
    reserve = next(r for r in p.reserves if r.host == home)
    assert reserve.dedicated and reserve.price_per_hour == pytest.approx(2.4)


def test_a_zone_failure_that_cannot_be_covered_says_which_service_and_why() -> None:
    hosts = [
        PoolHost("a0", "a", 16, 64 * G, 1.0, used_cores=12),
        PoolHost("b0", "b", 16, 64 * G, 1.0, used_cores=12),
    ]
    services = [PoolService("big", "a0", 12.0, G), PoolService("other", "b0", 12.0, G)]
    p = plan(hosts, services)
    assert dict(p.unplaced).keys() == {"big", "other"}
    assert "4.00 cores" not in dict(p.unplaced)["big"] and "12.00 cores" in dict(p.unplaced)["big"]
    cov = check(hosts, services, p.as_dict())
    assert not cov.all_covered and cov.zone_covered == 0


def test_the_count_catches_a_placement_that_overfills_a_host_in_a_zone_failure() -> None:
    hosts, services = fleet(per_zone=3, spare=False)
    # both of zone a's... all three on b0, which has 12 cores free: one zone failure lands 12 there, fine;
    # a fourth from zone a would not be
    bad = {s.name: "b0" for s in services if s.primary.startswith("a")}
    cov = check(hosts, services, bad)
    assert not [f for f in cov.shortfalls if f.scenario == "zone a" and "would need" in f.why]
    hosts = [replace(h, used_cores=6) if h.name == "b0" else h for h in hosts]
    cov = check(hosts, services, bad)
    assert any(f.scenario == "zone a" and "b0 would need 12.00 cores" in f.why for f in cov.shortfalls)
    assert not any(f.scenario.startswith("host") and "would need" in f.why for f in cov.shortfalls)


def test_a_replan_with_nothing_changed_moves_nothing() -> None:
    hosts, services = fleet(per_zone=4)
    first = plan(hosts, services)
    again = plan(hosts, services, first.as_dict())
    assert again.moves == () and again.as_dict() == first.as_dict()


def test_max_moves_bounds_the_moves_a_cheaper_plan_would_make_but_not_the_forced_ones() -> None:
    hosts, services = fleet(per_zone=3)
    # a start where every service sits on the dearest possible host that is still safe
    dear = [
        replace(h, price_per_hour=h.price_per_hour * (10 if h.name.endswith("-spare") else 1)) for h in hosts
    ]
    start = plan(dear, services).as_dict()
    free = plan(hosts, services, start)
    assert len(free.moves) >= 2, free.moves
    bounded = plan(hosts, services, start, PlanOptions(max_moves=1))
    assert len(bounded.moves) == 1 and check(hosts, services, bounded.as_dict()).all_covered
    # a shadow whose host went away moves even with no moves allowed, and says why
    gone = next(iter(start.values()))
    hosts2 = [replace(h, usable=False) if h.name == gone else h for h in hosts]
    forced = plan(hosts2, services, start, PlanOptions(max_moves=0))
    assert forced.moves and all(m.before == gone and "not usable" in m.reason for m in forced.moves)


def test_duplicate_names_are_refused() -> None:
    hosts, services = fleet(per_zone=1)
    with pytest.raises(PlacementError, match="hosts: a host name appears twice"):
        plan([*hosts, hosts[0]], services)
