"""Services divided among controller replicas (`[cluster] shards`) through a real 3-member etcd cluster
(mutual TLS, on loopback): each replica is a real `Replica` in its own process (lab/shard_probe.py) printing
every change of "may act for shard k" sampled every 5 ms on the machine's monotonic clock, so that every
replica's acting intervals per shard can be laid side by side. Once settled, the shards are divided as the
ring says (capacity grows with replicas); a replica killed, stopped or joining moves shards, and no two
replicas ever act for one shard at once. Times are printed, never asserted."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.cluster.shards import DEFAULT_SETTLE_SECONDS, assignment
from lab.etcd import EtcdCluster
from lab.shard_probe import ShardProcess, covered, double_actors
from tests.support import wait_until

TTL = 2
SHARDS = 8


@pytest.fixture
def start(etcd: EtcdCluster, tmp_path: Path) -> Iterator[Callable[[str], ShardProcess]]:
    prefix = f"/test/{uuid.uuid4().hex}"  # each test its own cluster
    probes: list[ShardProcess] = []

    def one(name: str) -> ShardProcess:
        probes.append(ShardProcess(etcd, name, prefix, SHARDS, tmp_path, TTL))
        return probes[-1]

    try:
        yield one
    finally:
        for p in probes:
            p.stop()


def ring(names: list[str]) -> dict[int, list[str]]:
    return {k: [name] for k, name in assignment(SHARDS, names).items()}


def settle_on(probes: list[ShardProcess], names: list[str], timeout: float) -> float:
    """Wait until the live replicas act for exactly the ring's shards over `names`; how long it took."""
    t0, want = time.monotonic(), ring(names)
    wait_until(lambda: covered(probes, SHARDS) == want, timeout, f"the shards divided as {want}")
    return time.monotonic() - t0


def test_the_shards_are_divided_as_the_ring_says(start: Callable[[str], ShardProcess]) -> None:
    probes = [start(n) for n in ("r1", "r2", "r3")]
    took = settle_on(probes, ["r1", "r2", "r3"], 30)
    held = {p.name: sorted(p.acting()) for p in probes}
    print(f"3 replicas, {SHARDS} shards settled in {took:.2f} s: {held}")
    assert all(held.values()), f"a replica acts for no shard: {held}"
    assert not (bad := double_actors(probes, SHARDS)), bad


def test_a_killed_replicas_shards_go_to_the_others(start: Callable[[str], ShardProcess]) -> None:
    probes = [start(n) for n in ("r1", "r2", "r3")]
    settle_on(probes, ["r1", "r2", "r3"], 30)
    victim = next(p for p in probes if p.acting())
    lost = sorted(victim.acting())
    victim.kill9()
    rest = [p for p in probes if p is not victim]
    wait_until(lambda: all(covered(rest, SHARDS)[k] for k in lost), 30, f"the others to act for {lost}")
    back = time.monotonic() - (victim.ended_at or 0)
    took = settle_on(rest, [p.name for p in rest], 30 + DEFAULT_SETTLE_SECONDS)
    print(
        f"kill -9 of {victim.name}: its shards {lost} acted for again {back:.2f} s later (TTL {TTL} s); "
        f"the ring over the two others settled {took:.2f} s later"
    )
    assert not (bad := double_actors(probes, SHARDS)), bad


def test_a_replica_that_joins_takes_its_share_with_no_two_actors(
    start: Callable[[str], ShardProcess],
) -> None:
    probes = [start(n) for n in ("r1", "r2")]
    settle_on(probes, ["r1", "r2"], 30)
    probes.append(start("r3"))
    want = sorted(k for k, names in ring(["r1", "r2", "r3"]).items() if names == ["r3"])
    assert want, "the ring gives r3 no shard: the test needs other names"
    took = settle_on(probes, ["r1", "r2", "r3"], 30 + DEFAULT_SETTLE_SECONDS)
    print(f"r3 joined: acting for its shards {want} {took:.2f} s after its start")
    assert sorted(probes[-1].acting()) == want
    assert not (bad := double_actors(probes, SHARDS)), bad


def test_a_replica_paused_past_its_leases_wakes_up_acting_for_nothing_it_lost(
    start: Callable[[str], ShardProcess],
) -> None:
    """SIGSTOP (a GC pause, a stalled VM) longer than the TTL: the others take its shards; when it wakes it
    must not act for them before its campaign learns anything."""
    probes = [start(n) for n in ("r1", "r2", "r3")]
    settle_on(probes, ["r1", "r2", "r3"], 30)
    victim = next(p for p in probes if p.acting())
    had = victim.acting()
    victim.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    rest = [p for p in probes if p is not victim]
    wait_until(lambda: all(covered(rest, SHARDS)[k] for k in had), 30, f"the others to act for {sorted(had)}")
    time.sleep(0.5)
    victim.signal(signal.SIGCONT)
    for k in had:
        wait_until(lambda k=k: victim.transitions(k)[-1][0] > stopped, 5, f"{victim.name} to sample {k}")
        after = [(t, a) for t, a in victim.transitions(k) if t > stopped]
        assert after[0][1] is False, f"{victim.name} woke up acting for shard {k}: {after[:3]}"
    # it rejoins and gets its shards back from the others, one hand-over each
    took = settle_on(probes, ["r1", "r2", "r3"], 30 + DEFAULT_SETTLE_SECONDS)
    print(f"{victim.name} paused past its leases: back to its shards {sorted(had)} {took:.2f} s after waking")
    assert not (bad := double_actors(probes, SHARDS, {victim.name: stopped})), bad
