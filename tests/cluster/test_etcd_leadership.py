"""Controller replicas elect one leader through a real 3-member etcd cluster (Debian's etcd-server, mutual
TLS, on loopback), and no two ever act as leader at once: each replica runs in its own process
(lab/elector_probe.py) and prints every change of its `acts()` sampled every 5 ms on the machine's
monotonic clock, so the acting intervals of all replicas can be laid side by side. Faults are real: kill -9
of the leader, SIGSTOP of the leader, one etcd member killed, every etcd member stopped.

Times are printed, never asserted (the leadership's bounds are in controller/cluster/leadership.py and are
measured by bench/)."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.cluster.dcs import increment
from lab.elector_probe import ElectorProcess, acting_spans, one_leader, two_leaders
from lab.etcd import EtcdCluster
from tests.support import wait_until

TTL = 2


@pytest.fixture
def replicas(etcd: EtcdCluster, tmp_path: Path) -> Iterator[list[ElectorProcess]]:
    key = f"/test/leader/{uuid.uuid4().hex}"  # each test its own election
    probes = [ElectorProcess(etcd, f"r{i}", key, tmp_path, TTL) for i in range(1, 4)]
    try:
        yield probes
    finally:
        for p in probes:
            p.stop()


def leader(probes: list[ElectorProcess]) -> ElectorProcess:
    return one_leader(probes, 20)


def assert_never_two(probes: list[ElectorProcess], stopped_at: dict[str, float] | None = None) -> int:
    spans = acting_spans(probes, stopped_at)
    assert not (bad := two_leaders(spans)), bad
    return len(spans)


def test_one_replica_leads_and_another_takes_over_after_kill_9(replicas: list[ElectorProcess]) -> None:
    first = leader(replicas)
    time.sleep(1.0)
    first.kill9()
    rest = [p for p in replicas if p is not first]
    second = leader(rest)
    took = second.intervals(time.monotonic())[-1][0] - (first.ended_at or 0)
    print(f"kill -9 of {first.name}: {second.name} acted {took:.2f} s later (TTL {TTL} s)")
    assert assert_never_two(replicas) >= 2


def test_a_leader_paused_past_its_lease_wakes_up_not_acting(replicas: list[ElectorProcess]) -> None:
    """A leader that hangs (SIGSTOP: a GC pause, a stalled VM) while another takes over must not act when it
    wakes up: `acts()` applies the rules at the moment it is asked, before its campaign learns anything."""
    first = leader(replicas)
    first.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    rest = [p for p in replicas if p is not first]
    leader(rest)
    time.sleep(0.5)
    first.signal(signal.SIGCONT)
    # (it may print before this process reads the clock: it wakes at the signal)
    wait_until(lambda: first.transitions()[-1][0] > stopped, 5, f"{first.name} to sample again")
    after = [(t, a) for t, a in first.transitions() if t > stopped]
    assert after[0][1] is False, f"{first.name} woke up acting: {after[:3]}"
    time.sleep(1.0)
    assert assert_never_two(replicas, {first.name: stopped}) >= 2


def test_losing_one_etcd_member_changes_nothing(etcd: EtcdCluster, replicas: list[ElectorProcess]) -> None:
    first = leader(replicas)
    status = etcd.dcs().status()
    follower = next(m for m in etcd.members if m.name != status.leader_name)
    since = time.monotonic()
    etcd.kill(follower.name)
    try:
        time.sleep(3 * TTL)
        assert first.acting() and all(not p.acting() for p in replicas if p is not first)
        assert [a for t, a in first.transitions() if t > since] == [], f"{first.name}'s standing changed"
    finally:
        etcd.restart(follower.name)
        etcd.wait_ready(30)
    assert_never_two(replicas)


def test_etcd_stopped_entirely_nobody_acts_and_a_leader_returns(
    etcd: EtcdCluster, replicas: list[ElectorProcess]
) -> None:
    """Fail-static: with no etcd the leader stops acting (no new moves) within its bound, nobody else starts,
    and when etcd returns a leader acts again by itself."""
    leader(replicas)
    for m in etcd.members:
        etcd.pause(m.name)
    paused = time.monotonic()
    try:
        time.sleep(3 * TTL)
        assert not any(p.acting() for p in replicas), "a replica acts without etcd"
        last_act = max(e for p in replicas for _, e in p.intervals(time.monotonic()))
        print(f"etcd stopped: the leader stopped acting {last_act - paused:.2f} s later (TTL {TTL} s)")
    finally:
        for m in etcd.members:
            etcd.resume(m.name)
    back = leader(replicas)
    print(f"etcd back: {back.name} acts {time.monotonic() - paused - 3 * TTL:.2f} s after the resume")
    assert_never_two(replicas)


def test_fencing_tokens_from_compare_and_set_are_unique_and_grow(etcd: EtcdCluster) -> None:
    """Three replicas take tokens at once: every token is taken exactly once, and they only grow."""
    key = f"/test/token/{uuid.uuid4().hex}"
    got: dict[int, list[int]] = {i: [] for i in range(3)}

    def take(i: int) -> None:
        dcs = etcd.dcs()
        for _ in range(20):
            got[i].append(increment(dcs, key))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = sorted(x for xs in got.values() for x in xs)
    assert every == list(range(1, 61))
    assert all(xs == sorted(xs) for xs in got.values()), "each replica's tokens grow"
