"""The failover decision: each rule, as a pure function of a snapshot."""

from __future__ import annotations

import dataclasses

from controller.failover.decide import (
    RETRY_FIRST_MS,
    RETRY_MAX_MS,
    Request,
    Snapshot,
    Tally,
    decide,
    retry_wait_ms,
    tally,
)

OBS = ["controller", "s1", "s2"]
UP = Tally(up=2, down=0, voters=2)
DOWN = Tally(up=0, down=2, voters=2, down_by=("controller", "s1"))


def snap(**kw: object) -> Snapshot:
    base = Snapshot(
        name="web",
        primary="p1",
        shadows=("s1", "s2"),
        failback="auto",
        failback_hold_ms=5000,
        flap_window_ms=60_000,
        owner="p1",
        token=3,
        last_failover_ms=0,
        health={"p1": UP, "s1": UP, "s2": UP},
        renewing=Tally(up=3, voters=3),
        connected=frozenset({"p1", "s1", "s2"}),
        primary_up_since_ms=0,
        now_ms=1_000_000,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_tally_excludes_the_target_and_ignores_unknown() -> None:
    t = tally(OBS, {"controller": False, "s1": False, "s2": True}, exclude="s1")
    assert (t.voters, t.down, t.up) == (2, 1, 1) and not t.majority_down
    t = tally(OBS, {"controller": False}, exclude="p1")
    assert t.down == 1 and not t.majority_down  # unknown is never a vote


def test_stable_service_does_nothing() -> None:
    assert decide(snap()).action == "none"


def test_owner_down_fails_over_to_first_ready_shadow() -> None:
    d = decide(snap(health={"p1": DOWN, "s1": UP, "s2": UP}, connected=frozenset({"s1", "s2"})))
    assert (d.action, d.target, d.planned) == ("failover", "s1", False)
    assert "owner p1 is down" in d.reason
    d = decide(snap(health={"p1": DOWN, "s1": DOWN, "s2": UP}))
    assert d.target == "s2" and d.planned  # p1's agent is connected: it can release first


def test_partition_from_controller_alone_does_not_fail_over() -> None:
    only_controller = Tally(up=1, down=1, voters=2, down_by=("controller",))
    assert (
        decide(
            snap(health={"p1": only_controller, "s1": UP, "s2": UP}, connected=frozenset({"s1", "s2"}))
        ).action
        == "none"
    )


def test_damping_blocks_a_second_failover_but_force_does_not() -> None:
    s = snap(health={"p1": DOWN, "s1": UP, "s2": UP}, last_failover_ms=990_000)
    d = decide(s)
    assert d.action == "none" and d.damped and "--force" in d.reason
    assert decide(dataclasses.replace(s, request=Request("failover", force=True))).action == "move"
    assert decide(dataclasses.replace(s, request=Request("failover"))).action == "none"


def test_failback_after_hold_only_in_auto_mode() -> None:
    s = snap(owner="s1", primary_up_since_ms=1_000_000 - 6000)
    d = decide(s)
    assert (d.action, d.target) == ("failback", "p1")
    assert decide(dataclasses.replace(s, primary_up_since_ms=1_000_000 - 4000)).action == "none"
    assert decide(dataclasses.replace(s, failback="manual")).action == "none"
    assert decide(dataclasses.replace(s, failback="manual", request=Request("failback"))).action == "failback"


def test_no_owner_places_on_primary_or_a_ready_shadow() -> None:
    assert decide(snap(owner="")).target == "p1"
    d = decide(snap(owner="", health={"p1": DOWN, "s1": UP, "s2": UP}))
    assert (d.action, d.target) == ("place", "s1")
    assert decide(snap(owner="", connected=frozenset())).action == "none"


def test_failed_placements_back_off_then_retry() -> None:
    # the first failure is retried at once (one slow agent, one lost vote)
    assert decide(snap(owner="", failed_placements=1, failed_ago_ms=0)).action == "place"
    waits = [retry_wait_ms("web", n) for n in range(2, 10)]
    assert all(RETRY_FIRST_MS // 2 <= w <= RETRY_MAX_MS for w in waits)
    assert waits[-1] >= RETRY_MAX_MS // 2 and waits[0] <= RETRY_FIRST_MS  # doubling, up to the cap
    assert retry_wait_ms("web", 4) == retry_wait_ms("web", 4)  # the same in every replica
    assert len({retry_wait_ms(f"svc{i}", 5) for i in range(50)}) > 10  # services spread out
    wait = retry_wait_ms("web", 3)
    d = decide(snap(owner="", failed_placements=3, failed_ago_ms=wait - 1))
    assert d.action == "none" and "3 placements in a row failed" in d.reason
    assert decide(snap(owner="", failed_placements=3, failed_ago_ms=wait)).action == "place"
    # an owner's failover is never held back by earlier placements' failures, nor an operator's request
    d = decide(snap(failed_placements=9, failed_ago_ms=0, health={"p1": DOWN, "s1": UP, "s2": UP}))
    assert d.action == "failover"
    held = snap(owner="", failed_placements=9, failed_ago_ms=0, request=Request("failover", to="s1"))
    assert decide(held).action == "move"


def test_lapsed_lease_reacquires_or_fails_over_unplanned() -> None:
    lapsed = Tally(up=0, down=2, voters=3, down_by=("s1", "s2"))
    d = decide(snap(renewing=lapsed))
    assert (d.action, d.target, d.planned) == ("reacquire", "p1", True)
    d = decide(snap(renewing=lapsed, connected=frozenset({"s1", "s2"})))
    # Unplanned: the orchestrator cannot hear the old owner, so it waits out the address lifetime.
    assert (d.action, d.target, d.planned) == ("failover", "s1", False)
    assert "its agent is gone" in d.reason


def test_requests_are_checked() -> None:
    assert (
        "not ready" in decide(snap(request=Request("failover", to="s1"), connected=frozenset({"p1"}))).reason
    )
    assert "already owns" in decide(snap(request=Request("failover", to="p1"))).reason
    assert "neither" in decide(snap(request=Request("failover", to="x9"))).reason
    assert decide(snap(request=Request("failover", to="s2"))).target == "s2"
    assert "already on the primary" in decide(snap(request=Request("failback"))).reason


def test_a_lapsed_lease_waits_for_the_health_checks_before_reacquiring() -> None:
    """A cut-off owner's lease lapses before the checks fail when the lease is shorter than detection: the
    loop waits for them rather than reacquiring on a host it cannot reach."""
    lapsed = Tally(up=0, down=2, voters=3, down_by=("s1", "s2"))
    d = decide(snap(renewing=lapsed, renewing_down_for_ms=300, detection_ms=800))
    assert d.action == "none" and "waiting for the health checks (they take up to 800 ms" in d.reason
    # the same reason while it waits: one event, not one per tick
    assert decide(snap(renewing=lapsed, renewing_down_for_ms=500, detection_ms=800)).reason == d.reason
    # the checks have had their time and see the owner fine: its agent had a hiccup, it takes a new token
    d = decide(snap(renewing=lapsed, renewing_down_for_ms=800, detection_ms=800))
    assert (d.action, d.target) == ("reacquire", "p1")
    # they see it down: a failover (not a reacquire on a host that does not answer)
    down = Tally(up=0, down=2, voters=2, down_by=("s1", "s2"))
    d = decide(
        snap(
            renewing=lapsed,
            renewing_down_for_ms=300,
            detection_ms=800,
            health={"p1": down, "s1": UP, "s2": UP},
        )
    )
    assert (d.action, d.target) == ("failover", "s1")
    # undecided checks after detection: not a reacquire either
    split = Tally(up=1, down=1, voters=3, down_by=("s1",))
    d = decide(
        snap(
            renewing=lapsed,
            renewing_down_for_ms=900,
            detection_ms=800,
            health={"p1": split, "s1": UP, "s2": UP},
        )
    )
    assert (d.action, d.target, d.planned) == ("failover", "s1", True)
    assert "not seen up by a majority" in d.reason


def test_the_failback_hold_counts_from_the_last_move_too() -> None:
    """An operator's move away from a healthy primary stands for the hold, not one tick."""
    s = snap(owner="s1", primary_up_since_ms=0, now_ms=1_000_000, last_transition_ms=999_000)
    d = decide(s)
    assert d.action == "none"  # moved 1 s ago, hold 5 s
    d = decide(dataclasses.replace(s, now_ms=1_004_000))
    assert (d.action, d.target) == ("failback", "p1") and "healthy for 5.0 s" in d.reason


def test_a_service_without_shadows_never_moves_and_says_why() -> None:
    lone = {"shadows": (), "health": {"p1": DOWN}, "connected": frozenset()}
    d = decide(snap(**lone))
    assert d.action == "none" and d.reason.endswith("no shadow: failover disabled (service.shadows is empty)")
    assert "owner p1 is down" in d.reason
    # its lease lapsed and the checks had their time: still nothing to move to
    d = decide(snap(**lone, renewing=Tally(down=1, voters=1), renewing_down_for_ms=5000, detection_ms=800))
    assert d.action == "none" and "no shadow: failover disabled" in d.reason
    # an operator asking gets the same answer, naming the fix
    d = decide(snap(**lone, request=Request("failover", force=True)))
    assert (
        d.action == "none"
        and d.reason.startswith("no shadow: failover disabled")
        and "add shadow" in d.reason
    )
    # with its agent back, an owner that stopped renewing takes a new token in place, as with shadows
    d = decide(
        snap(
            shadows=(),
            health={"p1": UP},
            renewing=Tally(down=1, voters=1),
            renewing_down_for_ms=5000,
            detection_ms=800,
        )
    )
    assert (d.action, d.target) == ("reacquire", "p1")
    # and it is placed on its primary
    assert decide(snap(shadows=(), owner="")).action == "place"


# ---- degraded zones (controller/pool/zones.py): nothing lands there ----

ZONE_B = {"s1": "zone b degraded: 2 of 3 hosts down (>= 50%): b2 (its agent is not heard from)"}


def test_a_failover_skips_a_shadow_in_a_degraded_zone() -> None:
    down = {"health": {"p1": DOWN, "s1": UP, "s2": UP}, "connected": frozenset({"s1", "s2"})}
    assert decide(snap(**down)).target == "s1"
    d = decide(snap(**down, degraded=ZONE_B))
    assert (d.action, d.target) == ("failover", "s2")


def test_a_degraded_zone_is_the_last_resort_and_the_reason_says_so() -> None:
    # s2 is down too: s1, in the degraded zone, is the only ready host; a service there beats one down
    d = decide(snap(health={"p1": DOWN, "s1": UP, "s2": DOWN}, connected=frozenset({"s1"}), degraded=ZONE_B))
    assert (d.action, d.target) == ("failover", "s1")
    assert "s1 is in a degraded zone, the only ready host" in d.reason and "zone b degraded" in d.reason


def test_no_failback_into_a_degraded_zone() -> None:
    base = {"owner": "s1", "primary_up_since_ms": 1, "last_transition_ms": 1}
    assert decide(snap(**base)).action == "failback"
    primary_zone = {"p1": "zone a degraded: 3 of 4 hosts down (>= 50%)"}
    assert decide(snap(**base, degraded=primary_zone)).action == "none"


def test_placement_avoids_a_degraded_primary_when_a_shadow_elsewhere_is_ready() -> None:
    primary_zone = {"p1": "zone a degraded"}
    d = decide(snap(owner="", token=0, degraded=primary_zone))
    assert (d.action, d.target) == ("place", "s1") and "degraded zone" in d.reason
    # nowhere else: served from the degraded zone rather than not at all
    d = decide(snap(owner="", token=0, degraded={**primary_zone, "s1": "b", "s2": "b"}))
    assert (d.action, d.target) == ("place", "p1") and "in a degraded zone, the only ready host" in d.reason


def test_an_operators_move_into_a_degraded_zone_needs_force() -> None:
    d = decide(snap(request=Request("failover", to="s1"), degraded=ZONE_B))
    assert d.action == "none" and "--force" in d.reason
    d = decide(snap(request=Request("failover", to="s1", force=True), degraded=ZONE_B))
    assert (d.action, d.target) == ("move", "s1")
    d = decide(snap(request=Request("failover"), degraded=ZONE_B))
    assert (d.action, d.target) == ("move", "s2")
    d = decide(snap(request=Request("failover"), degraded={**ZONE_B, "s2": "zone b degraded"}))
    assert d.action == "none" and "--force" in d.reason
