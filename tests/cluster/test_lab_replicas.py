"""Three controller replicas on a 3-member etcd cluster in the lab (`lab up --controllers 3`: one replica and
one etcd member per controller namespace, mutual TLS everywhere), with real agents and web servers. Every
test samples every host's addresses every 10 ms for two owners of one VIP while a client polls the VIP, and
puts a real fault on the replicas or on etcd: kill -9 of the leader (in steady state, during a failover), a
rolling restart of every replica, one etcd member killed, etcd stopped entirely for 30 s, and a partition
that isolates the leader with a minority of etcd.

Outages are asserted against bounds derived from the timings (the lab's failover bound, the leader key's
TTL); the times themselves are printed, and measured by bench/leader_failover.py."""

from __future__ import annotations

import functools
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controller.cluster.leadership import DEFAULT_TTL_SECONDS
from controller.cluster.replica import SYNC_INTERVAL_SECONDS
from lab.configs import controller_process
from lab.poller import Poller, Record, outages
from lab.runner import Lab
from lab.spec import Spec, Timings
from lab.vipcheck import Report as VipReport
from lab.vipcheck import VipChecker
from shadowplane.v1 import fleet_pb2 as fpb
from tests.support import need, need_root, wait_until

REPLICAS = ("ctl", "ctl2", "ctl3")
# A new leader acts at most one TTL after the old one's last renewal, plus a campaign interval (TTL / 3),
# plus one read of the shared state; 1 s for a loaded 2-core machine.
LEADER_CHANGE_BOUND_SECONDS = DEFAULT_TTL_SECONDS * 4 / 3 + SYNC_INTERVAL_SECONDS + 1.0
# A partition that isolates etcd's own leader costs etcd an election first (up to twice its 1 s election
# timeout), and etcd renews every lease by its TTL when its leader changes: the old key lives that much
# longer.
ETCD_ELECTION_SECONDS = 2.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need_root()
    need(shutil.which("etcd"), "etcd missing", "apt-get install etcd-server (make setup installs it)")
    with Lab.up(Spec(controllers=3, timings=Timings(failback_hold_seconds=2.0))) as lab:
        yield lab


def everything_up(lab: Lab) -> None:
    """Each test starts from the same place: every etcd member and replica running, one leader, the VIP on
    p1 with the transition that put it there finished, as every replica sees it."""
    for h in REPLICAS:
        for name in (f"etcd-{h}", controller_process(h)):
            if not lab.alive(name):
                lab.restart(name)
    for fh in lab.plan.fleet_hosts():
        lab.restore_link(fh.name)
    lab.leader(30)
    lab.wait_owner(None, "p1", 30)

    def settled() -> bool:
        views = [services(lab, h) for h in REPLICAS]
        return all(v is not None and (v.owner, v.phase) == ("p1", "stable") for v in views)

    wait_until(settled, 30, "every replica to see web on p1, stable")


def services(lab: Lab, replica: str) -> fpb.ServiceStatus | None:
    try:
        return lab.fleet(replica).ListServices(fpb.ListServicesRequest(), timeout=1).services[0]
    except Exception:
        return None


def process(replica: str) -> str:
    return controller_process(replica)


def story(lab: Lab, replica: str, since_ms: int) -> list[tuple[str, str, str]]:
    evs = lab.fleet(replica).ListEvents(fpb.ListEventsRequest(limit=1000), timeout=5).events
    return [(e.kind, e.host, e.reason) for e in evs if e.unix_ms >= since_ms]


def moves(lab: Lab, replica: str, since_ms: int) -> list[tuple[str, str, str]]:
    return [e for e in story(lab, replica, since_ms) if e[0] in ("failover", "reacquire", "move", "place")]


def sampled(lab: Lab) -> tuple[Poller, VipChecker]:
    return lab.poller().start(), lab.vipcheck().start()


@dataclass
class Run:
    """A test's start: everything up, who leads, since when, the client and the address sampler running."""

    leader: str
    since_ms: int
    poller: Poller
    checker: VipChecker

    def stop(self) -> tuple[list[Record], VipReport]:
        return self.poller.stop(), self.checker.stop()


def begin(lab: Lab) -> Run:
    everything_up(lab)
    run = Run(lab.leader(), int(time.time() * 1000), *sampled(lab))
    time.sleep(0.5)
    return run


def assert_one_owner_always(report: VipReport) -> None:
    assert report.samples > 300, f"only {report.samples} address samples"
    assert not report.split_brains, f"two owners: {report.split_brains[:3]}"


def assert_hitless(records: list[Record], report: VipReport) -> None:
    assert_one_owner_always(report)
    assert {c.holders for c in report.changes} == {("p1",)}, f"the VIP left p1: {report.changes[:5]}"
    answered = {r.responder for r in records if r.ok}
    assert answered == {"p1"}, f"answered by {answered}"
    print("client outages:", [round(o.duration or -1, 3) for o in outages(records)])


def new_leader_after(lab: Lab, old: str, t0: float) -> tuple[str, float]:
    deadline = t0 + 30
    while time.monotonic() < deadline:
        states = lab.replica_states(0.5)
        leaders = [h for h, s in states.items() if s == "leader" and h != old]
        if leaders:
            return leaders[0], time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"no new leader: {lab.replica_states()}")


def telemetry(lab: Lab, replica: str, host: str, until_ms: int) -> list[bytes]:
    got = lab.fleet(replica).GetTelemetry(fpb.GetTelemetryRequest(host=host, limit=100), timeout=5).samples
    return [s.sample.SerializeToString() for s in got if s.sample.end_unix_ms <= until_ms]


def test_every_replica_keeps_the_same_telemetry_history(lab: Lab) -> None:
    """No cold start: agents stream to every replica, so each stores the same samples and a new leader
    forecasts from the history the old one had (the forecast is a function of it: tests/predict)."""
    everything_up(lab)
    time.sleep(3.0)  # a few samples
    until_ms = int(time.time() * 1000) - 1500  # what every replica has had time to receive
    for host in ("p1", "s1"):
        seen = {r: telemetry(lab, r, host, until_ms) for r in REPLICAS}
        assert len(seen["ctl"]) >= 2, f"{host}: samples on ctl: {len(seen['ctl'])}"
        assert seen["ctl"] == seen["ctl2"] == seen["ctl3"], {r: len(v) for r, v in seen.items()}


def test_the_leader_killed_in_steady_state_costs_the_client_nothing(lab: Lab) -> None:
    run = begin(lab)
    old, since_ms = run.leader, run.since_ms
    try:
        t0 = time.monotonic()
        lab.signal(process(old), signal.SIGKILL)
        new, took = new_leader_after(lab, old, t0)
        time.sleep(2.0)
    finally:
        records, report = run.stop()
    print(
        f"kill -9 of leader {old}: {new} leads after {took:.2f} s (bound {LEADER_CHANGE_BOUND_SECONDS:.2f} s)"
    )
    assert took < LEADER_CHANGE_BOUND_SECONDS
    assert_hitless(records, report)
    assert not moves(lab, new, since_ms), "nothing moved"
    # every surviving replica shows the same history, the dead leader's last events included
    survivors = [h for h in REPLICAS if h != old]
    wait_until(
        lambda: story(lab, survivors[0], 0) == story(lab, survivors[1], 0), 5, "the same events on both"
    )


def test_the_leader_killed_during_a_failover_ends_on_one_owner(lab: Lab) -> None:
    """The primary's link is cut; while the leader's takeover waits for the old owner's address to expire,
    the leader is killed. The next leader finds the record half done ("acquiring"), fences it with a newer
    token and places the service: one owner in the end, never two, within the failover bound plus a change
    of leader."""
    run = begin(lab)
    old, since_ms = run.leader, run.since_ms
    try:
        lab.cut_link("p1")

        def in_transition() -> bool:
            v = services(lab, old)
            return v is not None and v.phase in ("transition", "acquiring")

        wait_until(in_transition, 10, f"{old} to start the failover", interval=0.01)
        time.sleep(0.2)
        lab.signal(process(old), signal.SIGKILL)
        owner = lab.wait_owner(None, None, 30)
        time.sleep(1.0)
    finally:
        records, report = run.stop()
        lab.restore_link("p1")
    assert owner in ("s1", "s2")
    assert_one_owner_always(report)
    gaps = [o.duration for o in outages(records) if o.duration is not None]
    bound = lab.plan.spec.timings.max_failover_outage_seconds() + LEADER_CHANGE_BOUND_SECONDS
    print(
        f"failover with the leader killed mid-way: outages {[round(g, 3) for g in gaps]} s, "
        f"bound {bound:.2f} s"
    )
    assert gaps and max(gaps) < bound
    assert records[-1].ok, "the client's outage ended"
    new = lab.leader()
    kinds = [k for k, _, _ in story(lab, new, since_ms)]
    assert "recovered" in kinds, f"the new leader fenced the half-done takeover: {kinds}"
    (svc,) = lab.fleet(new).ListServices(fpb.ListServicesRequest(), timeout=5).services
    assert (svc.owner, svc.phase) == (owner, "stable")


def test_a_rolling_restart_of_every_replica_costs_the_client_nothing(lab: Lab) -> None:
    """SIGTERM and a new start of each replica in turn, as a package upgrade host by host does: the
    leader resigns on the way out (its successor need not wait out the TTL), nothing moves."""
    run = begin(lab)
    since_ms = run.since_ms
    try:
        for h in REPLICAS:
            lab.stop_process(process(h))
            lab.restart(process(h))
            wait_until(functools.partial(services, lab, h), 30, f"{h} to answer again")
            lab.leader(30)
        time.sleep(1.0)
    finally:
        records, report = run.stop()
    assert_hitless(records, report)
    leader = lab.leader()
    assert not moves(lab, leader, since_ms), moves(lab, leader, since_ms)


def test_one_etcd_member_killed_changes_nothing(lab: Lab) -> None:
    run = begin(lab)
    leader, since_ms = run.leader, run.since_ms
    try:
        lab.signal(f"etcd-{leader}", signal.SIGKILL)  # the member next to the leader, the one it may use
        time.sleep(5.0)
        states = lab.replica_states()
    finally:
        records, report = run.stop()
    assert_hitless(records, report)
    assert states[leader] == "leader", states
    assert all("unreachable" not in s for s in states.values()), states
    assert not moves(lab, leader, since_ms)


def test_etcd_stopped_for_30_s_is_fail_static_then_resumes(lab: Lab) -> None:
    """Every etcd member killed for 30 s: no replica acts (no moves), every replica says why, the VIP
    stays where it is; when etcd returns a leader acts again by itself, and a failover works."""
    run = begin(lab)
    try:
        for h in REPLICAS:
            lab.signal(f"etcd-{h}", signal.SIGKILL)
        stopped = time.monotonic()
        time.sleep(5.0)
        during = lab.replica_states()
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
        for h in REPLICAS:
            lab.restart(f"etcd-{h}")
        back = time.monotonic()
        leader = lab.leader(30)
        resumed = time.monotonic() - back
    finally:
        records, report = run.stop()
    print(f"etcd stopped 30 s: during {during}; {leader} leads {resumed:.2f} s after etcd is back")
    assert all(s.startswith("etcd unreachable") for s in during.values()), during
    assert_hitless(records, report)
    since_ms = int(time.time() * 1000)
    lab.cut_link("p1")
    try:
        lab.wait_owner(None, "s1", 30)  # the first shadow, as the decision core picks it
        assert [e for e in moves(lab, leader, since_ms) if e[0] == "failover"], "the cluster fails over again"
    finally:
        lab.restore_link("p1")


def test_a_partition_isolating_the_leader_with_a_minority_of_etcd(lab: Lab) -> None:
    """The leader's namespace (its replica and its etcd member) is cut off from the other two: its member
    is a minority, its renewals fail, it stops acting within TTL x (1 - margin); one of the others leads.
    The agents still reach every replica; nothing moves; after the heal it follows."""
    run = begin(lab)
    old, since_ms = run.leader, run.since_ms
    others = [h for h in REPLICAS if h != old]
    try:
        t0 = time.monotonic()
        for h in others:
            lab.partition(old, h)
        new, took = new_leader_after(lab, old, t0)
        isolated = lab.replica_states()[old]
        time.sleep(1.0)
        for h in others:
            lab.heal(old, h)
        wait_until(
            lambda: lab.replica_states()[old] == f"following {lab.leader()}",
            30,
            f"{old} to follow the leader",
        )
    finally:
        records, report = run.stop()
        for h in others:
            lab.heal(old, h)
    print(
        f"partition: {new} leads after {took:.2f} s (bound "
        f"{LEADER_CHANGE_BOUND_SECONDS + ETCD_ELECTION_SECONDS:.2f} s); the isolated {old} says: {isolated}"
    )
    assert took < LEADER_CHANGE_BOUND_SECONDS + ETCD_ELECTION_SECONDS
    assert isolated != "leader"
    assert_hitless(records, report)
    assert not moves(lab, new, since_ms)
