"""The division of services among controller replicas (controller/cluster/shards.py): which shard a service
is in, which replica should hold each shard, and what one replica does about a shard, each case varying one
field of what the replica knows."""

from __future__ import annotations

import math

import pytest

from controller.cluster.shards import DEFAULT_SETTLE_SECONDS, assignment, move, preferred, shard_of

NOW = 1_000.0
OLD = NOW - DEFAULT_SETTLE_SECONDS - 1  # a member seen long enough to be handed shards
NEW = NOW - 1.0  # one seen only just now


def test_a_service_is_in_the_same_shard_everywhere_and_one_shard_holds_all() -> None:
    names = [f"svc-{i}" for i in range(400)]
    shards = [shard_of(n, 8) for n in names]
    assert shards == [shard_of(n, 8) for n in names]  # no per-process salt (Python's hash() has one)
    assert set(shards) == set(range(8))
    assert min(shards.count(k) for k in range(8)) > 400 / 8 / 2, "services spread over every shard"
    assert {shard_of(n, 1) for n in names} == {0}


@pytest.mark.parametrize(("replicas", "shards"), [(2, 8), (3, 8), (3, 16), (4, 64), (7, 64)])
def test_every_replica_gets_its_share_and_a_join_moves_few_shards(replicas: int, shards: int) -> None:
    before = assignment(shards, [f"r{i}" for i in range(replicas)])
    after = assignment(shards, [f"r{i}" for i in range(replicas + 1)])
    for plan, n in ((before, replicas), (after, replicas + 1)):
        assert sorted(plan) == list(range(shards))
        loads = [list(plan.values()).count(f"r{i}") for i in range(n)]
        assert max(loads) <= math.ceil(shards / n) and min(loads) >= 1, loads
    moved = [k for k in range(shards) if before[k] != after[k]]
    assert len(moved) <= 2 * math.ceil(shards / (replicas + 1)), f"{len(moved)} of {shards} moved"
    assert assignment(shards, [f"r{i}" for i in reversed(range(replicas))]) == before  # order-free


def ring_choice(shard: int, shards: int, members: list[str]) -> str:
    return preferred(shard, shards, members)


# one shard whose ring choice between "me" and "other" is "other", one where it is "me"
THEIRS = next(k for k in range(8) if ring_choice(k, 8, ["me", "other"]) == "other")
MINE = next(k for k in range(8) if ring_choice(k, 8, ["me", "other"]) == "me")


def test_holding_the_ring_s_choice_keeps_it() -> None:
    assert move(MINE, 8, "me", {"me": OLD, "other": OLD}, "me", None, NOW).action == "hold"


def test_holding_another_s_shard_hands_it_over_once_that_member_has_settled() -> None:
    m = move(THEIRS, 8, "me", {"me": OLD, "other": OLD}, "me", None, NOW)
    assert (m.action, m.reason) == ("resign", f"handing shard {THEIRS} to other, the ring's choice")
    # the same, the other seen only just now (it may be flapping): kept
    assert move(THEIRS, 8, "me", {"me": OLD, "other": NEW}, "me", None, NOW).action == "hold"
    # the same, the other gone from the members: kept
    assert move(THEIRS, 8, "me", {"me": OLD}, "me", None, NOW).action == "hold"


def test_a_shard_held_by_another_is_followed() -> None:
    m = move(MINE, 8, "me", {"me": OLD, "other": OLD}, "other", None, NOW)
    assert (m.action, m.reason) == ("follow", f"shard {MINE}: held by other")


def test_a_vacant_shard_is_campaigned_for_by_the_ring_s_choice_only() -> None:
    members = {"me": OLD, "other": OLD}
    assert move(MINE, 8, "me", members, "", NOW, NOW).action == "campaign"
    assert move(THEIRS, 8, "me", members, "", NOW, NOW).action == "wait"
    # a newcomer counts for a vacant shard: held by it is better than by nobody
    assert move(MINE, 8, "me", {"me": NEW, "other": OLD}, "", NOW, NOW).action == "campaign"
    # not a member in the store yet (its membership key not written): it waits
    assert move(MINE, 8, "me", {"other": OLD}, "", NOW, NOW).action == "wait"


def test_a_vacant_shard_left_too_long_by_the_ring_s_choice_is_taken() -> None:
    members = {"me": OLD, "other": OLD}
    assert move(THEIRS, 8, "me", members, "", NOW - 1.0, NOW).action == "wait"
    m = move(THEIRS, 8, "me", members, "", NOW - DEFAULT_SETTLE_SECONDS, NOW)
    assert m.action == "campaign" and "other has not taken it" in m.reason


def test_a_shard_the_ring_over_every_member_gives_back_is_kept() -> None:
    """The ring over settled members says another, the ring over every member (a newcomer counted) says this
    one: handing it over would only see the others leave it, and this one take it back, again and again."""
    names = ["me", "other", "new"]
    k = next(
        k
        for k in range(64)
        if preferred(k, 64, ["me", "other"]) == "other" and preferred(k, 64, names) == "me"
    )
    members = {"me": OLD, "other": OLD, "new": NEW}
    assert move(k, 64, "me", members, "me", None, NOW).action == "hold"
    # once the newcomer has settled, both rings say the same: the shard is kept (the ring's choice)
    assert move(k, 64, "me", {**members, "new": OLD}, "me", None, NOW).action == "hold"
