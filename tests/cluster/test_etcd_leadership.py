"""Controller replicas elect one leader through a real 3-member etcd cluster (Debian's etcd-server, mutual
TLS, on loopback), and no two ever act as leader at once: each replica runs in its own process
(tests/cluster/elector_probe.py) and prints every change of its `acts()` sampled every 5 ms on the machine's
monotonic clock, so the acting intervals of all replicas can be laid side by side. Faults are real: kill -9
of the leader, SIGSTOP of the leader, one etcd member killed, every etcd member stopped.

Times are printed, never asserted (the leadership's bounds are in controller/cluster/leadership.py and are
measured by bench/)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.cluster.dcs import increment
from lab.etcd import EtcdCluster
from lab.procs import child_env, python_module
from tests.support import need, wait_until

TTL = 2


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    need(shutil.which("etcd"), "etcd missing", "apt-get install etcd-server (make setup installs it)")
    cluster = EtcdCluster.start(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster
    finally:
        cluster.down()


class Probe:
    def __init__(self, etcd: EtcdCluster, name: str, key: str, workdir: Path, ttl: int = TTL) -> None:
        self.name, self.out, self.err = name, workdir / f"{name}.out", workdir / f"{name}.log"
        argv = python_module("tests.cluster.elector_probe", "--name", name, "--leader-key", key)
        for e in etcd.endpoints:
            argv += ["--endpoint", e]
        argv += ["--ca", etcd.tls.ca, "--cert", etcd.tls.cert, "--key", etcd.tls.key, "--ttl", str(ttl)]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=err, start_new_session=True, env=child_env()
            )
        self.ended_at: float | None = None  # killed: it acted at most until here

    def transitions(self) -> list[tuple[float, bool]]:
        rows = [line.split() for line in self.out.read_text().splitlines() if line.strip()]
        return [(float(t), a == "1") for t, a in rows]

    def acting(self) -> bool:
        t = self.transitions()
        return bool(t) and t[-1][1] and self.ended_at is None

    def intervals(self, now: float, cut: dict[float, float] | None = None) -> list[tuple[float, float]]:
        """When it acted: from each 1 to the next 0 (or its death, or now). `cut` ends an interval that
        began before a SIGSTOP at the stop (a stopped process acts on nothing), once the test has checked
        that it woke up not acting."""
        out, start = [], None
        for t, a in self.transitions():
            if a and start is None:
                start = t
            elif not a and start is not None:
                out.append((start, t))
                start = None
        if start is not None:
            out.append((start, self.ended_at if self.ended_at is not None else now))
        for stopped, _ in (cut or {}).items():
            out = [(s, min(e, stopped) if s <= stopped else e) for s, e in out]
        return out

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.ended_at = time.monotonic()

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def replicas(etcd: EtcdCluster, tmp_path: Path) -> Iterator[list[Probe]]:
    key = f"/test/leader/{uuid.uuid4().hex}"  # each test its own election
    probes = [Probe(etcd, f"r{i}", key, tmp_path) for i in range(1, 4)]
    try:
        yield probes
    finally:
        for p in probes:
            p.stop()


def leader(probes: list[Probe]) -> Probe:
    wait_until(lambda: sum(p.acting() for p in probes) == 1, 20, "one replica to lead")
    (p,) = [p for p in probes if p.acting()]
    return p


def assert_never_two(probes: list[Probe], cut: dict[str, dict[float, float]] | None = None) -> int:
    now = time.monotonic()
    spans = sorted((s, e, p.name) for p in probes for s, e in p.intervals(now, (cut or {}).get(p.name)))
    until, who = float("-inf"), ""
    for s, e, name in spans:
        assert s >= until, f"two leaders: {who} acted until {until:.3f}, {name} from {s:.3f}"
        if e > until:
            until, who = e, name
    return len(spans)


def test_one_replica_leads_and_another_takes_over_after_kill_9(replicas: list[Probe]) -> None:
    first = leader(replicas)
    time.sleep(1.0)
    first.kill9()
    rest = [p for p in replicas if p is not first]
    second = leader(rest)
    took = second.intervals(time.monotonic())[-1][0] - (first.ended_at or 0)
    print(f"kill -9 of {first.name}: {second.name} acted {took:.2f} s later (TTL {TTL} s)")
    assert assert_never_two(replicas) >= 2


def test_a_leader_paused_past_its_lease_wakes_up_not_acting(replicas: list[Probe]) -> None:
    """A leader that hangs (SIGSTOP: a GC pause, a stalled VM) while another takes over must not act when it
    wakes up: `acts()` applies the rules at the moment it is asked, before its campaign learns anything."""
    first = leader(replicas)
    first.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    rest = [p for p in replicas if p is not first]
    leader(rest)
    time.sleep(0.5)
    first.signal(signal.SIGCONT)
    resumed = time.monotonic()
    # (it may print before this process reads the clock: it wakes at the signal)
    wait_until(lambda: first.transitions()[-1][0] > stopped, 5, f"{first.name} to sample again")
    after = [(t, a) for t, a in first.transitions() if t > stopped]
    assert after[0][1] is False, f"{first.name} woke up acting: {after[:3]}"
    time.sleep(1.0)
    assert assert_never_two(replicas, {first.name: {stopped: resumed}}) >= 2


def test_losing_one_etcd_member_changes_nothing(etcd: EtcdCluster, replicas: list[Probe]) -> None:
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
    etcd: EtcdCluster, replicas: list[Probe]
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
