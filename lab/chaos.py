"""The fault-injection suite (`python -m lab chaos`): faults injected into a running lab while a client
polls the VIP (lab/poller.py) and a checker samples every host's addresses every 10 ms (lab/vipcheck.py),
in the spirit of Jepsen's nemesis and Pacemaker's CTS.

Each scenario starts from a settled lab (the primary holds the VIP, the controller says "stable", every
agent connected and healthy), injects its fault, heals it, waits until the lab has settled again (the
service fails back after the lab's hold time) and reports `Figures`: samples with two owners, the client's
longest outage (and the bound derived from the lab's timings where it applies), moves and moves that should
not have happened, events and telemetry lost, daemons that died. A scenario that leaves the lab unable to
settle gets a fresh lab (said in the figures' note), so one broken scenario does not poison the next.

What injects each fault (this kernel has no sch_netem, so loss and delay are not netem):
- partitions: blackhole routes between the two hosts' namespaces (`Lab.partition`);
- link down / flapping: the host's bridge port set down and up (`Lab.cut_link`);
- hung agent: SIGSTOP / SIGCONT; dead processes: SIGKILL; the controller killed during a vote (its stored
  service phase turns "acquiring") or during an acquire (the VIP appears on the new owner); restarts
  (`systemctl restart`): SIGTERM, then the same command again;
- loss: iptables `statistic --mode random` DROP on the host's outgoing packets;
- delay: iptables NFQUEUE on the host's outgoing packets to a userspace delay line (lab/delayline.py);
- CPU and I/O saturation: stress-ng in the owner's workload cgroup (CPU: one worker per core; I/O: writers
  with O_DIRECT, since the lab's hosts share one disk and one page cache: buffered writers and sync() would
  stall every host's writes, not only the owner's);
- rogue host: lab/rogue.py in the client's namespace, with an agent certificate of a fleet host (s2), or
  with none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from lab.configs import credentials
from lab.poller import Record, outages
from lab.procs import python_module
from lab.runner import Lab, LabError
from lab.spec import CONTROLLER_PORT, PEER_PORT, Spec, Timings
from shadowplane.v1 import fleet_pb2 as fpb

SETTLE_TIMEOUT_SECONDS = 30.0
MOVE_KINDS = ("failover", "move")  # decisions that take the service away from its owner
TELEMETRY_CATCH_UP_SECONDS = 3.0  # agents resend their backlog after a reconnect


@dataclass(frozen=True)
class Figures:
    scenario: str
    seconds: float  # from the fault to settled again
    samples: int  # vipcheck samples (every 10 ms)
    two_owner_samples: int
    outage_seconds: float | None  # the client's longest outage; None: it never ended
    outage_bound_seconds: float | None  # Timings.max_failover_outage_seconds where the bound applies
    moves: int  # failover/move decisions of the controller
    false_failovers: int  # moves in a scenario whose owner stayed healthy
    events_lost: int  # gaps in the event ids
    telemetry_lost: int  # sample intervals missing from the store, hosts whose agent ran throughout
    daemons_died: tuple[str, ...]  # lab daemons found dead that the scenario did not kill on purpose
    rogue_grants: int = 0  # renewals a rogue host got granted (each one is a hole)
    settled: bool = True  # the lab came back: the primary owns the VIP, every agent connected and healthy
    note: str = ""

    def safe(self) -> bool:
        return self.two_owner_samples == 0 and self.false_failovers == 0 and self.rogue_grants == 0

    def outage_within_bound(self) -> bool | None:
        if self.outage_bound_seconds is None:
            return None
        return self.outage_seconds is not None and self.outage_seconds <= self.outage_bound_seconds


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    inject: Callable[[Chaos], str]  # applies the fault and heals it; returns a note
    move_allowed: bool  # the owner really fails (or cannot be heard): a move is right
    outage_bounded: bool = False  # the link-cut outage bound applies
    disturbs_agents: tuple[
        str, ...
    ] = ()  # hosts whose agent is stopped/killed: their telemetry gap is the fault


class Chaos:
    """A lab for fault injection, its client poller and checker. `quick` shortens every fault (tests)."""

    def __init__(self, spec: Spec | None = None, quick: bool = False) -> None:
        self.spec = spec or chaos_spec()
        self.quick = quick
        self.lab = Lab.up(self.spec)
        self.primary = self.lab.service().primary
        self.rogue_grants = 0

    def __enter__(self) -> Chaos:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.down()

    def hold(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    # ---- settling ----

    def settled(self) -> bool:
        if self.lab.vip_holders() != [self.primary]:
            return False
        try:
            (svc,) = self.lab.fleet().ListServices(fpb.ListServicesRequest(), timeout=2).services
            rows = self.lab.list_hosts(timeout=2)
        except grpc.RpcError:
            return False
        healthy = {r["host"] for r in rows if r["connected"] and r["health"] == "healthy"}
        want = {h.name for h in self.lab.plan.fleet_hosts()}
        return svc.owner == self.primary and svc.phase == "stable" and want <= healthy

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT_SECONDS) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.settled():
                return True
            time.sleep(0.1)
        return False

    def unsettled(self) -> str:
        """What keeps the lab from settling, for the figures' note."""
        try:
            (svc,) = self.lab.fleet().ListServices(fpb.ListServicesRequest(), timeout=2).services
            rows = self.lab.list_hosts(timeout=2)
        except grpc.RpcError as e:
            return f"did not settle again: the controller did not answer ({e.code().name})"
        bad = [
            f"{r['host']} {r['health']}" for r in rows if not (r["connected"] and r["health"] == "healthy")
        ]
        return (
            f"did not settle again: VIP on {','.join(self.lab.vip_holders()) or 'nobody'}, controller says"
            f" {svc.owner or 'nobody'} ({svc.phase})"
            + (f", hosts not healthy: {', '.join(bad)}" if bad else "")
        )

    def daemons(self) -> list[str]:
        return [
            r.name
            for r in self.lab.state.processes
            if r.name.split("-")[0] in ("controller", "agent", "httpd")
        ]

    def rebuild(self) -> None:
        self.lab.down()
        self.lab = Lab.up(self.spec)

    # ---- one scenario ----

    def run(self, sc: Scenario) -> Figures:
        notes: list[str] = []
        if not self.wait_settled():
            self.rebuild()
            notes.append("lab rebuilt before the scenario (it had not settled)")
            if not self.wait_settled():
                raise LabError(f"{sc.name}: a fresh lab did not settle on {self.primary}")
        t = self.lab.plan.spec.timings
        baseline = last_event_id(self.lab)
        checker, poller = self.lab.vipcheck().start(), self.lab.poller().start()
        self.checker, self.rogue_grants = checker, 0
        t0, t0_ms = time.monotonic(), int(time.time() * 1000)
        try:
            time.sleep(0.3)
            notes.append(sc.inject(self))
            settled = self.wait_settled()
            time.sleep(0.3)
        finally:
            records, report = poller.stop(), checker.stop()
        t1, t1_ms = time.monotonic(), int(time.time() * 1000)
        dead = tuple(n for n in self.daemons() if not self.lab.alive(n))
        for n in dead:  # the next scenario needs them
            with contextlib.suppress(LabError):
                self.lab.restart(n)
        events = new_events(self.lab, baseline)
        moves = sum(e.kind in MOVE_KINDS for e in events)
        lost = telemetry_lost(self.lab, t0_ms, t1_ms, exclude=sc.disturbs_agents)
        figures = Figures(
            scenario=sc.name,
            seconds=round(t1 - t0, 2),
            samples=report.samples,
            two_owner_samples=len(report.split_brains),
            outage_seconds=longest_outage(records, t0),
            outage_bound_seconds=round(t.max_failover_outage_seconds(), 3) if sc.outage_bounded else None,
            moves=moves,
            false_failovers=0 if sc.move_allowed else moves,
            events_lost=ids_missing([e.id for e in events], baseline),
            telemetry_lost=lost,
            daemons_died=dead,
            rogue_grants=self.rogue_grants,
            settled=settled,
            note="; ".join(n for n in [*notes, "" if settled else self.unsettled()] if n),
        )
        if not settled:
            self.rebuild()
        return figures

    # ---- helpers the scenarios use ----

    def service_phase(self) -> str:
        """The service's phase as the controller stored it (read from its SQLite file, not over gRPC, so
        watching it costs the controller nothing)."""
        db = self.lab.workdir / "controller.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)) as c:
            row = c.execute(
                "SELECT phase FROM service_state WHERE name = ?", (self.lab.service().name,)
            ).fetchone()
        return str(row[0]) if row else ""

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error):
                if pred():
                    return True
            time.sleep(0.005)
        return False

    def holders(self) -> tuple[str, ...]:
        return self.checker.current(self.lab.service().vip_ip)


def chaos_spec(timings: Timings | None = None, plaintext: bool = False, shadows: int = 2) -> Spec:
    # the lab's timings by default, with a short failback hold so each scenario settles back on the
    # primary quickly
    t = dataclasses.replace(timings or Timings(), failback_hold_seconds=1.0)
    return Spec(timings=t, plaintext=plaintext, shadows=shadows)


def last_event_id(lab: Lab) -> int:
    evs = lab.fleet().ListEvents(fpb.ListEventsRequest(limit=1), timeout=5).events
    return max((e.id for e in evs), default=0)


def new_events(lab: Lab, after: int) -> list[fpb.Event]:
    out: list[fpb.Event] = []
    while True:
        evs = lab.fleet().ListEvents(fpb.ListEventsRequest(after_id=after, limit=500), timeout=5).events
        out += evs
        if len(evs) < 500:
            return out
        after = max(e.id for e in evs)


def ids_missing(ids: list[int], after: int) -> int:
    """Event ids are consecutive (SQLite AUTOINCREMENT, nothing pruned in a scenario): count the holes."""
    if not ids:
        return 0
    return max(ids) - after - len(set(ids))


def longest_outage(records: list[Record], since: float) -> float | None:
    worst = 0.0
    for o in outages(records):
        start = o.start if o.start is not None else o.end
        if start is None or start < since:
            continue
        if o.duration is None:
            return None
        worst = max(worst, o.duration)
    return round(worst, 3)


def telemetry_lost(lab: Lab, t0_ms: int, t1_ms: int, exclude: tuple[str, ...] = ()) -> int:
    """Telemetry intervals missing from the controller's store between t0 and t1, for each host whose agent
    the scenario left running (a stopped agent samples nothing: that is not a loss). Waits a little for
    agents to resend their backlog."""
    interval_ms = lab.plan.spec.timings.agent_interval_seconds * 1000
    time.sleep(TELEMETRY_CATCH_UP_SECONDS)
    db = lab.workdir / "controller.db"
    missing = 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        for h in lab.plan.fleet_hosts():
            if h.name in exclude:
                continue
            workload = lab.plan.workloads(h.name)[0][0].name
            ends = [
                int(r[0])
                for r in c.execute(
                    "SELECT end_ms FROM samples WHERE host = ? AND workload = ? AND end_ms BETWEEN ? AND ?"
                    " ORDER BY end_ms",
                    (h.name, workload, t0_ms - interval_ms, t1_ms),
                )
            ]
            for a, b in itertools.pairwise(ends):
                if b - a > 1.5 * interval_ms:
                    missing += round((b - a) / interval_ms) - 1
    return missing


# ---- the scenarios ----


def _partition(pairs: list[tuple[str, str]], full: float, quick: float) -> Callable[[Chaos], str]:
    def inject(c: Chaos) -> str:
        for a, b in pairs:
            c.lab.partition(a, b)
        try:
            time.sleep(c.hold(full, quick))
        finally:
            for a, b in pairs:
                c.lab.heal(a, b)
        return ""

    return inject


def _sigstop(service_dies: bool) -> Callable[[Chaos], str]:
    def inject(c: Chaos) -> str:
        p = c.primary
        if service_dies:
            c.lab.signal(f"httpd-{p}", signal.SIGKILL)
        c.lab.signal(f"agent-{p}", signal.SIGSTOP)
        try:
            time.sleep(c.hold(4.0, 3.0))
        finally:
            c.lab.signal(f"agent-{p}", signal.SIGCONT)
            if service_dies:
                c.lab.restart(f"httpd-{p}")
        return ""

    return inject


def _kill_controller(during: str) -> Callable[[Chaos], str]:
    def inject(c: Chaos) -> str:
        p = c.primary
        c.lab.cut_link(p)
        try:
            if during == "vote":
                hit = c.wait(lambda: c.service_phase() == "acquiring", 10)
            else:
                hit = c.wait(lambda: any(h != p for h in c.holders()), 10)
            c.lab.signal("controller", signal.SIGKILL)
            time.sleep(0.5)
            c.lab.restart("controller")
            time.sleep(c.hold(3.0, 2.0))
        finally:
            c.lab.restore_link(p)
        return "" if hit else f"the {during} was not seen: killed the controller late"

    return inject


def _kill_agent(c: Chaos) -> str:
    p = c.primary
    c.lab.signal(f"agent-{p}", signal.SIGKILL)
    moved = c.wait(lambda: any(h != p for h in c.holders()), 15)
    time.sleep(c.hold(1.0, 0.5))
    c.lab.restart(f"agent-{p}")
    return "" if moved else "the service did not move off the host whose agent died"


def _restart(name: str) -> Callable[[Chaos], str]:
    """`systemctl restart`: SIGTERM (the daemon's clean stop), then the same command again."""

    def inject(c: Chaos) -> str:
        c.lab.stop_process(name)
        c.lab.restart(name)
        time.sleep(c.hold(3.0, 2.0))
        return ""

    return inject


def _flap(c: Chaos) -> str:
    p = c.primary
    end = time.monotonic() + c.hold(60.0, 6.0)
    try:
        while time.monotonic() < end:
            c.lab.cut_link(p)
            time.sleep(0.5)
            c.lab.restore_link(p)
            time.sleep(0.5)
    finally:
        c.lab.restore_link(p)
    return ""


def _impair(kind: str) -> Callable[[Chaos], str]:
    def inject(c: Chaos) -> str:
        p = c.primary
        try:
            if kind == "loss":
                c.lab.add_loss(p, 0.3)
            else:
                c.lab.add_delay(p, 0.1)
            time.sleep(c.hold(10.0, 4.0))
        finally:
            c.lab.clear_impairments(p)
        return ""

    return inject


def _stress(kind: str) -> Callable[[Chaos], str]:
    def inject(c: Chaos) -> str:
        p = c.primary
        seconds = c.hold(15.0, 6.0)
        scratch = c.lab.workdir / "stress"
        scratch.mkdir(exist_ok=True)
        load = (
            ["--cpu", "0", "--cpu-method", "matrixprod"]  # one worker per CPU
            if kind == "cpu"
            else ["--hdd", "2", "--hdd-opts", "direct", "--hdd-bytes", "64M", "--temp-path", str(scratch)]
        )
        name = f"stress-{kind}-{p}"
        c.lab.spawn_load(p, ["stress-ng", *load, "--timeout", f"{seconds:g}s", "--quiet"], name)
        try:
            time.sleep(seconds)
        finally:
            c.lab.stop_process(name)
        return ""

    return inject


def _rogue(with_cert: bool) -> Callable[[Chaos], str]:
    def inject(c: Chaos) -> str:
        lab = c.lab
        thief = lab.service().shadows[-1]  # whose certificate the rogue holds
        observers = [f"{lab.host('ctl').ipv4}:{CONTROLLER_PORT}"] + [
            f"{lab.host(s).ipv4}:{PEER_PORT}" for s in lab.service().shadows
        ]
        argv = python_module(
            "lab.rogue", "--service", lab.service().name, "--as", thief, "--owner", c.primary
        )
        for o in observers:
            argv += ["--observer", o]
        argv += ["--controller", observers[0], "--seconds", str(c.hold(4.0, 3.0))]
        if not lab.plan.spec.plaintext:
            cred = credentials(lab.workdir, "agent", thief)
            argv += ["--ca", str(cred.ca)]
            if with_cert:
                argv += ["--cert", str(cred.cert), "--key", str(cred.key)]
        out = lab.run_in("client", argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise LabError(f"lab.rogue failed: {out.stderr.strip()[-500:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        c.rogue_grants = sum(got.get("renew_granted", {}).values())
        return ""

    return inject


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "partition-controller-primary",
        "controller and primary cannot reach each other; the shadows reach both",
        _partition([("ctl", "p1")], 4.0, 2.0),
        move_allowed=False,
    ),
    Scenario(
        "partition-primary-shadows",
        "the primary cannot reach either shadow (it keeps the controller)",
        _partition([("p1", "s1"), ("p1", "s2")], 4.0, 2.0),
        move_allowed=True,
        outage_bounded=True,
    ),
    Scenario(
        "partition-halves",
        "the fleet split in two: {p1, s1} | {ctl, s2}",
        _partition([("p1", "ctl"), ("p1", "s2"), ("s1", "ctl"), ("s1", "s2")], 4.0, 2.0),
        move_allowed=True,
        # not the link-cut bound: the preferred shadow (s1) is cut off with the owner, and the controller may
        # pick it before its own checks of s1 fail
    ),
    Scenario(
        "owner-agent-sigstop",
        "the owner's agent hangs (SIGSTOP), its service keeps answering",
        _sigstop(False),
        True,
        disturbs_agents=("p1",),
    ),
    Scenario(
        "owner-agent-sigstop-service-dies",
        "the owner's agent hangs and its web server is killed at the same moment",
        _sigstop(True),
        move_allowed=True,
        outage_bounded=True,  # the owner cannot confirm a release: the new owner waits out its address
        disturbs_agents=("p1",),
    ),
    Scenario(
        "controller-kill-vote",
        "link of the owner cut; kill -9 of the controller during the vote",
        _kill_controller("vote"),
        True,
    ),
    Scenario(
        "controller-kill-acquire",
        "link of the owner cut; kill -9 of the controller while the new owner acquires",
        _kill_controller("acquire"),
        move_allowed=True,
    ),
    Scenario(
        "owner-agent-kill",
        "kill -9 of the owner's agent (its address stays until its lifetime)",
        _kill_agent,
        True,
        outage_bounded=True,  # as for a cut link: nobody hears the owner, its address is waited out
        disturbs_agents=("p1",),
    ),
    Scenario(
        "controller-restart",
        "SIGTERM and a new start of the controller (systemctl restart): the owner renews with the two "
        "shadows meanwhile, a majority without the controller",
        _restart("controller"),
        move_allowed=False,
    ),
    Scenario(
        "owner-agent-restart",
        "SIGTERM and a new start of the owner's agent (systemctl restart); it resumes its lease only if the "
        "observers still grant it. The lab's 0.25 s lease is shorter than a restart, so the service may "
        "move meanwhile, and then the restarted agent must not take the VIP back",
        _restart("agent-p1"),
        move_allowed=True,
        disturbs_agents=("p1",),
    ),
    Scenario(
        "link-flap",
        "the owner's link 0.5 s down, 0.5 s up, for 60 s (6 s quick)",
        _flap,
        True,
        disturbs_agents=("p1",),
    ),
    Scenario(
        "loss-30",
        "30 % of the owner's outgoing packets dropped",
        _impair("loss"),
        True,
        disturbs_agents=("p1",),
    ),
    Scenario(
        "delay-100ms",
        "the owner's outgoing packets delayed 100 ms",
        _impair("delay"),
        True,
        disturbs_agents=("p1",),
    ),
    Scenario(
        "cpu-saturation",
        "stress-ng: one CPU worker per core in the owner's service cgroup",
        _stress("cpu"),
        False,
    ),
    Scenario(
        "io-saturation",
        "stress-ng: disk writers and sync in the owner's service cgroup",
        _stress("io"),
        False,
    ),
    Scenario(
        "rogue-agent-cert",
        "a host with s2's agent certificate renews with token 2^62 in its own name, in the owner's name, "
        "for other services, and reports the owner down",
        _rogue(True),
        move_allowed=False,
    ),
    Scenario("rogue-no-cert", "the same rogue without a client certificate", _rogue(False), False),
)


def scenario(name: str) -> Scenario:
    for sc in SCENARIOS:
        if sc.name == name:
            return sc
    raise KeyError(f"no chaos scenario {name!r}; scenarios: {', '.join(s.name for s in SCENARIOS)}")


def random_schedule(minutes: float, seed: int) -> Iterator[Scenario]:
    """Scenarios drawn at random (with `seed`) until `minutes` have passed."""
    rng = random.Random(seed)
    end = time.monotonic() + minutes * 60
    while time.monotonic() < end:
        yield rng.choice(SCENARIOS)


def run_scenarios(
    scenarios: Iterator[Scenario] | list[Scenario],
    quick: bool = False,
    on_figures: Callable[[Figures], None] = lambda _: None,
    spec: Spec | None = None,
) -> list[Figures]:
    out = []
    with Chaos(spec, quick) as chaos:
        for sc in scenarios:
            f = chaos.run(sc)
            on_figures(f)
            out.append(f)
    return out


@dataclass(frozen=True)
class Totals:
    scenarios: int
    two_owner_samples: int
    false_failovers: int
    rogue_grants: int
    events_lost: int
    telemetry_lost: int
    daemons_died: int
    outages_over_bound: int


def totals(figs: list[Figures]) -> Totals:
    return Totals(
        len(figs),
        sum(f.two_owner_samples for f in figs),
        sum(f.false_failovers for f in figs),
        sum(f.rogue_grants for f in figs),
        sum(f.events_lost for f in figs),
        sum(f.telemetry_lost for f in figs),
        sum(len(f.daemons_died) for f in figs),
        sum(f.outage_within_bound() is False for f in figs),
    )


HEADER = (
    f"{'scenario':<34} {'secs':>5} {'samples':>7} {'2 owners':>8} {'outage s':>9} {'bound s':>7}"
    f" {'moves':>5} {'false':>5} {'rogue':>5} {'ev lost':>7} {'tel lost':>8}  died / note"
)


def row(f: Figures) -> str:
    out = "never" if f.outage_seconds is None else f"{f.outage_seconds:.3f}"
    bound = "-" if f.outage_bound_seconds is None else f"{f.outage_bound_seconds:.3f}"
    tail = ", ".join(f.daemons_died) or "-"
    return (
        f"{f.scenario:<34} {f.seconds:>5.1f} {f.samples:>7} {f.two_owner_samples:>8} {out:>9} {bound:>7}"
        f" {f.moves:>5} {f.false_failovers:>5} {f.rogue_grants:>5} {f.events_lost:>7}"
        f" {f.telemetry_lost:>8}  {tail}" + (f" / {f.note}" if f.note else "")
    )


def figures_json(f: Figures) -> dict[str, Any]:
    return dataclasses.asdict(f) | {"outage_within_bound": f.outage_within_bound()}


def print_table(figs: list[Figures], file: Any = sys.stdout) -> None:
    print(HEADER, file=file)
    for f in figs:
        print(row(f), file=file)
