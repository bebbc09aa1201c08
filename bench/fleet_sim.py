"""Fleet simulator: N simulated agents against a real controller, over real gRPC with mutual TLS.

    .venv/bin/python bench/fleet_sim.py [--hosts 100 500 1000 2000] [--seconds 60] [--out FILE]
        [--observers agents] [--replicas 1 2 3 [--shards 8]]

Each simulated agent runs the agent's own stream code (`agentd.link.ControllerLink`, one TLS connection with
its own host certificate): a hello with 3 workloads, a telemetry batch every `--interval` (10 s, the
shipped default) whose CPU and memory follow real utilisation traces (../shared/traces/nab), heartbeats
every second, and the controller's commands answered: votes by the agent's real observer code
(`agentd.failover.ObserverRole`), acquire, release, limits, hooks. A quarter of the hosts are primaries of
a leased service with the next host as its shadow; each owner renews its lease with the controller at the
lab's timing (lease 0.25 s, a renewal every 0.05 s) and the controller runs the service's health checks
(TCP, every 0.2 s, against a listener of this process). What a fleet of real agents would do, without the
hosts: eBPF, cgroups and addresses are the parts left out.

`--observers agents`: how a fleet of thousands is configured (docs/fleet-scale.md): each service's
observers are three agent hosts (its shadow and two others), not the controller, so neither the renewals
nor the health probes reach the controller; it hears their views (a health and a lease view per observer,
on change and once on each new stream, as `agentd.failover.ObserverRole` sends them: its own lease
view code on its own `LeaseObserver`), asks them for votes, and decides. The simulated observers do not probe
over TCP and owners renew with them by a call, not over gRPC (7,500 probes and 30,000 renewals a second
at 2,000 hosts are the agents' work, spread over 2,000 hosts, not one process's): a target is up until
its host dies, then down after fall x interval (0.6 s, shipped).

`--replicas 1 2 3`: one run per value. 1 is the single controller on SQLite (the embedded default); above 1,
that many `[cluster]` replicas on one etcd member (on this machine too), the services divided among them in
`--shards` (8) shards, each simulated agent streaming to every replica over the agent's own `ControllerLinks`
and sending each what that replica asks for (`apb.Interest`: heartbeats and views to the replica acting for
its service, telemetry to it and to the next in line). The warm-up then also waits for the shards to be
divided; the line per run gives each replica's CPU and loop lag, the busiest one's, and their sum.

The controller runs as shipped (`controller.cli run`, production defaults but for the lab's lease and
renewal timings and a fresh store), in its own process; the fleet runs in `--fleet-procs` processes
(2) of its own. Per N it prints: ingest (batches acknowledged per second, backlog left), the controller's
event-loop lag (its own `shadowplane_controller_loop_lag_seconds` histogram over the measured window:
p50/p99/max bucket bounds, and the max since it started), renewal round
trips as owners see them (p50/p99/max), the controller's CPU and memory, the store's growth per
host-day, the scaling cycle's duration (its `shadowplane_scaling_cycle_*` gauges), and spurious lease
actions (lease lost, reacquire or failover events while every simulated host is healthy: must be 0);
then one primary's host dies (its stream and renewals stop) and the time until its shadow is told to
take over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import multiprocessing as mp
import os
import random
import re
import sqlite3
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from agentd.failover import ObserverRole
from agentd.link import CHANNEL_OPTIONS, Backlog, ControllerLink, ControllerLinks
from lab.etcd import EtcdCluster
from lab.procs import free_port, spawn, stop, wait_for_port
from shadowplane import gc_pauses
from shadowplane.loop_lag import BUCKETS, LoopLag
from shadowplane.pki import init_ca, issue
from shadowplane.tls import TlsConfig, aio_channel, sync_channel
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import lease_pb2 as lpb
from shadowplane.v1 import lease_pb2_grpc as lgrpc
from shadowplane.v1 import telemetry_pb2 as tpb
from training.traces import load_trace_dir

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces" / "nab"
# the lab's (lab/spec.py Timings); `--shipped-leases`: the shipped 0.5 s and 0.1 s
TIMINGS = {"lease": 0.25, "renew": 0.05}
WORKLOADS = ("app", "cache", "batch")
SPURIOUS = ("lease-lost", "reacquire", "failover", "move", "takeover-aborted", "transition-error")
MODE = {"observers": "controller"}  # --observers
CHECK = {"interval": 0.2, "fall": 3}  # the shipped [service.health] interval and fall


def host_name(i: int) -> str:
    return f"h{i:05d}"


@dataclass(frozen=True)
class Fleet:
    hosts: list[str]
    services: list[tuple[str, str, str]]  # (name, primary, shadow)

    @staticmethod
    def of(n: int) -> Fleet:
        hosts = [host_name(i) for i in range(n)]
        services = [(f"svc{i:05d}", hosts[i], hosts[i + 1]) for i in range(0, n - 1, 4)]
        return Fleet(hosts, services)

    def observers_of(self, primary: str) -> list[str]:
        """--observers agents: the service's shadow and the two hosts after it (hosts no service uses)."""
        i = self.hosts.index(primary)
        return [self.hosts[(i + k) % len(self.hosts)] for k in (1, 2, 3)]

    def service_of(self, host: str) -> tuple[str, str] | None:
        """(service, role) of the host's first workload, if it serves one."""
        for name, primary, shadow in self.services:
            if host == primary:
                return name, "primary"
            if host == shadow:
                return name, "shadow"
        return None


@dataclass(frozen=True)
class Cluster:
    """--replicas above 1: the etcd the replicas share, and how many shards the services are cut into."""

    etcd: EtcdCluster
    shards: int


def controller_toml(
    d: Path, fleet: Fleet, port: int, metrics_port: int, check_port: int, name: str = "",
    cluster: Cluster | None = None,
) -> str:  # fmt: skip
    out = [
        f'listen = "127.0.0.1:{port}"',
        f'[tls]\nca = "{d}/pki/ca.pem"\ncert = "{d}/pki/controller-controller.pem"\n'
        f'key = "{d}/pki/controller-controller.key"',
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"',
        f'[store]\npath = "{d}/controller{name and "-" + name}.db"',
        f"[failover]\nlease_seconds = {TIMINGS['lease']}\nrenew_interval_seconds = {TIMINGS['renew']}",
    ]
    if cluster is not None:
        e = cluster.etcd
        out.append(
            f'[cluster]\nname = "{name}"\netcd = {e.endpoints!r}\nca = "{e.tls.ca}"\ncert = "{e.tls.cert}"\n'
            f'key = "{e.tls.key}"\nshards = {cluster.shards}'.replace("'", '"')
        )
    for h in fleet.hosts:
        out.append(f'[[host]]\nname = "{h}"\naddress = "127.0.0.1"')
    for name, primary, shadow in fleet.services:
        # controller: one seat, the controller's, whose renewals this measures; agents: three agent hosts
        observers = ["controller"] if MODE["observers"] == "controller" else fleet.observers_of(primary)
        out.append(
            f'[[service]]\nname = "{name}"\nprimary = "{primary}"\nshadows = ["{shadow}"]\n'
            f'observers = {observers!r}\nvip = "10.99.0.1/24"\n'.replace("'", '"')
            + f'[service.health]\nkind = "tcp"\nport = {check_port}'
        )
    return "\n\n".join(out) + "\n"


@dataclass
class Stats:
    renew_rtt: list[float] = field(default_factory=list)
    renew_refused: int = 0
    renew_failed: int = 0
    acquires: int = 0


class SimAgent:
    def __init__(
        self, host: str, fleet: Fleet, pki: Path, targets: list[str], traces: list[np.ndarray],
        stats: Stats,
    ) -> None:  # fmt: skip
        self.host, self.stats, target = host, stats, targets[0]
        self.tls = TlsConfig(ca=pki / "ca.pem", cert=pki / f"agent-{host}.pem", key=pki / f"agent-{host}.key")
        served = fleet.service_of(host)
        self.workloads = [
            tpb.WorkloadInfo(
                name=w,
                cgroup=f"/sim/{w}",
                service=served[0] if served and i == 0 else "",
                role=(tpb.ROLE_PRIMARY if served[1] == "primary" else tpb.ROLE_SHADOW)
                if served and i == 0
                else tpb.ROLE_UNSPECIFIED,
            )
            for i, w in enumerate(WORKLOADS)
        ]
        rng = random.Random(host)
        self.demand = [(traces[rng.randrange(len(traces))], rng.randrange(1000)) for _ in WORKLOADS]
        self.instance = f"{host}-{os.getpid()}-{time.monotonic_ns()}"
        self.seq = 0
        # the agent's own observer code: votes, and (--observers agents) its leases and lease views
        self.role = ObserverRole(host, report=lambda m: self.link.send(m))
        self.checks: list[tuple[str, str]] = []  # (service, target) the controller's Watch asked to judge
        # (kind, service, target) -> (up, since unix ms), as last sent
        self.views: dict[tuple[str, str, str], tuple[bool, int]] = {}
        self.spec = fleet
        self.fleet: dict[str, SimAgent] = {}  # every simulated agent by host (renewals in-process)
        self.dead: dict[str, float] = {}  # hosts that died, when (shared by the whole fleet)
        self.owned: dict[str, asyncio.Task[None]] = {}
        # one link per controller replica, as the agent's daemon makes them (agentd/daemon.py)
        self.link = ControllerLinks(
            [
                ControllerLink(
                    t,
                    self.hello,
                    Backlog(720),
                    heartbeat_seconds=1.0,
                    reconnect_max_seconds=5.0,
                    on_command=self.on_command,
                    channel_factory=lambda t: aio_channel(t, self.tls, "controller", CHANNEL_OPTIONS),
                )
                for t in targets
            ]
        )
        self.link.greeting = self.greeting
        self.lease_channel = aio_channel(target, self.tls, "controller", CHANNEL_OPTIONS)

    def hello(self) -> apb.Hello:
        return apb.Hello(
            host=self.host, instance_id=self.instance, workloads=self.workloads, interval_ms=10_000,
            peer_address=f"{self.host}:7401",  # an observer's Lease port (renewals here are calls)
        )  # fmt: skip

    def batch(self, interval: float) -> apb.TelemetryBatch:
        self.seq += 1
        end = int(time.time() * 1000)
        samples = []
        for w, (trace, offset) in zip(WORKLOADS, self.demand, strict=True):
            u = min(1.0, max(0.0, float(trace[(offset + self.seq) % len(trace)]) / 100.0))  # of 2 cores
            samples.append(
                tpb.WorkloadSample(
                    workload=w,
                    cgroup=f"/sim/{w}",
                    start_unix_ms=end - int(interval * 1000),
                    end_unix_ms=end,
                    resources=tpb.Resources(
                        cpu_seconds=2.0 * u * interval,
                        cpu_limit_cores=2.0,
                        memory_bytes=int((0.5 + u) * (1 << 30)),
                        memory_limit_bytes=4 << 30,
                        tasks=8,
                    ),
                    syscalls=tpb.SyscallProfile(total=int(u * 40_000), by_name={"read": int(u * 20_000)}),
                )
            )
        return apb.TelemetryBatch(seq=self.seq, samples=samples)

    async def on_command(self, cmd: apb.Command) -> apb.CommandResult:
        r = apb.CommandResult(command_id=cmd.command_id, ok=True, incarnation=cmd.incarnation)
        kind = cmd.WhichOneof("action")
        if kind == "vote":
            r.vote.CopyFrom(self.role.vote(cmd.vote))
        elif kind == "watch":
            self.role.leases.observe(cmd.watch.observed_services, cmd.watch.lease_ms / 1000)
            self.checks = [(c.service, c.target) for c in cmd.watch.checks]
        elif kind == "acquire":
            a = cmd.acquire
            self.stats.acquires += 1
            old = self.owned.pop(a.service, None)
            if old is not None:
                old.cancel()
            self.owned[a.service] = asyncio.create_task(self.renew(a.service, a.token))
            r.address.CopyFrom(apb.AddressState(service=a.service, token=a.token, holds_address=True))
        elif kind == "release":
            t = self.owned.pop(cmd.release.service, None)
            if t is not None:
                t.cancel()
            r.address.CopyFrom(
                apb.AddressState(service=cmd.release.service, token=cmd.release.token, holds_address=False)
            )
        elif kind == "set_limits":
            s = cmd.set_limits
            r.limits.CopyFrom(
                apb.LimitsApplied(workload=s.workload, cpu_cores=s.cpu_cores, memory_bytes=s.memory_bytes)
            )
        elif kind == "run_hook":
            r.hook.CopyFrom(apb.HookResult(phase=cmd.run_hook.phase, found=False))
        return r

    async def renew(self, service: str, token: int) -> None:
        if MODE["observers"] == "agents":
            await self.renew_with_agents(service, token)
            return
        stub = lgrpc.LeaseStub(self.lease_channel)
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            try:
                rep = await stub.Renew(
                    lpb.RenewRequest(service=service, token=token, holder=self.host),
                    timeout=TIMINGS["renew"] * 4,
                )
                self.stats.renew_rtt.append(loop.time() - t0)
                if not rep.granted:
                    self.stats.renew_refused += 1
            except grpc.aio.AioRpcError:
                self.stats.renew_failed += 1
            await asyncio.sleep(max(0.0, TIMINGS["renew"] - (loop.time() - t0)))

    async def renew_with_agents(self, service: str, token: int) -> None:
        """The owner's renewals with its observer hosts' `LeaseObserver`s, by a call (see the docstring)."""
        seats = self.spec.observers_of(next(p for n, p, _ in self.spec.services if n == service))
        while True:
            for seat in seats:
                if seat in self.dead:
                    continue
                if not self.fleet[seat].role.leases.renew(service, token, self.host).granted:
                    self.stats.renew_refused += 1
            await asyncio.sleep(TIMINGS["renew"])

    def observe(self, now: float) -> None:
        """One round of what `ObserverRole` reports (--observers agents): each watched target's health
        (up until its host died, down fall x interval after), each observed lease's view from the agent's
        own code; on change (and all of them on each new stream: `greeting`)."""
        detect = CHECK["interval"] * CHECK["fall"]
        for service, target in self.checks:
            died = self.dead.get(target)
            up = died is None or now - died < detect
            key = ("health", service, target)
            last = self.views.get(key)
            if last is None or last[0] != up:
                self.views[key] = (up, int(time.time() * 1000))
                self.link.send(apb.AgentMessage(observation=self.health_view(service, target)))
        for service in self.role.leases.observed:
            view = self.role._lease_view(service)
            if view is None:
                continue
            key = ("lease", service, f"{view.target}/{view.token}")  # a new holder or token is news
            if self.views.get(key, (None, 0))[0] != view.up:
                self.views[key] = (view.up, view.since_unix_ms)
                self.link.send(apb.AgentMessage(observation=view))

    def health_view(self, service: str, target: str) -> apb.Observation:
        up, since = self.views[("health", service, target)]
        return apb.Observation(
            service=service, target=target, up=up, kind="health", since_unix_ms=since,
            detail="connected" if up else "connect failed: Connection refused",
        )  # fmt: skip

    def greeting(self) -> list[apb.AgentMessage]:
        """What `ObserverRole.views` gives a new stream: every view held now."""
        out = [
            apb.AgentMessage(observation=self.health_view(service, target))
            for kind, service, target in self.views
            if kind == "health"
        ]
        for service in self.role.leases.observed:
            view = self.role._lease_view(service)
            if view is not None:
                out.append(apb.AgentMessage(observation=view))
        return out

    async def run(self, interval: float) -> None:
        link = asyncio.create_task(self.link.run())
        try:
            await asyncio.sleep(random.random() * interval)  # agents start at random phases
            while True:
                self.link.submit(self.batch(interval))
                await asyncio.sleep(interval)
        finally:
            link.cancel()
            for t in self.owned.values():
                t.cancel()


async def tcp_listener() -> tuple[asyncio.base_events.Server, int]:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, backlog=4096)
    return server, server.sockets[0].getsockname()[1]


async def observe_forever(agents: list[SimAgent], dead: dict[str, float]) -> None:
    """--observers agents: every observer's round every 50 ms (`ObserverRole`'s)."""
    while True:
        now = time.monotonic()
        for a in agents:
            if a.host in dead or not (a.checks or a.role.leases.observed):
                continue
            a.observe(now)
        await asyncio.sleep(0.05)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def lag_buckets(text: str) -> dict[str, float]:
    """The controller's loop-lag histogram: cumulative count per bucket bound."""
    return {
        m[0]: float(m[1])
        for m in re.findall(
            r'^shadowplane_controller_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
        )
    }


def lag_quantiles(text: str, before: str) -> tuple[str, str, str, float]:
    """(p50, p99, max as bucket bounds, over the measured window: the histogram at its end less the one at
    its start; and the largest since the controller started, warm-up included, in seconds)."""
    end, start = lag_buckets(text), lag_buckets(before)
    cum = [end.get(le, 0.0) - start.get(le, 0.0) for le in (*map(repr, BUCKETS), "+Inf")]
    counts = [b - a for a, b in zip([0.0, *cum], cum, strict=False)]
    mx = re.search(r"^shadowplane_controller_loop_lag_max_seconds (\S+)$", text, re.M)
    q = [bucket_quantile(counts, p) for p in (0.5, 0.99, 1.0)]
    return q[0], q[1], q[2], float(mx.group(1)) if mx else float("nan")


def bucket_quantile(counts: list[float], p: float) -> str:
    """The bucket bound below which a share `p` of a loop-lag histogram's (non-cumulative) counts lie, one
    count per bound of `BUCKETS` and +Inf last (a LoopLag's `counts`)."""
    total, cum = sum(counts), 0.0
    if not total:
        return "?"
    for le, c in zip(BUCKETS, counts, strict=False):
        cum += c
        if cum >= p * total:
            return f"<={le * 1000:g}ms"
    return f">{BUCKETS[-1]}s"


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)  # with labels or without
    return float(m.group(1)) if m else float("nan")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


class Part:
    """One process of the simulated fleet: hosts [lo, hi) of it, driven over a pipe. Each service's hosts
    (primary, shadow, observers: 4 consecutive hosts) are in one part, so owners renew in-process."""

    def __init__(self, lo: int, hi: int, n: int, targets: list[str], pki: Path, interval: float) -> None:
        ctx = mp.get_context("spawn")  # gRPC does not survive a fork of a process that used it
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=part_main,
            args=(child, lo, hi, n, targets, pki, interval, dict(MODE), dict(TIMINGS), dict(CHECK)),
            daemon=True,
        )
        self.proc.start()
        self.lo, self.hi = lo, hi

    async def ask(self, cmd: str, arg: object = None) -> Any:
        self.conn.send((cmd, arg))
        return await asyncio.to_thread(self.conn.recv)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop", None))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def part_main(
    conn: Connection, lo: int, hi: int, n: int, targets: list[str], pki: Path, interval: float,
    mode: dict[str, str], timings: dict[str, float], check: dict[str, float],
) -> None:  # fmt: skip
    MODE.update(mode)
    TIMINGS.update(timings)
    CHECK.update(check)
    traces = [t.values for t in load_trace_dir(TRACES) if "cpu" in t.name]
    asyncio.run(run_part(conn, lo, hi, n, targets, pki, interval, traces))


async def run_part(
    conn: Connection, lo: int, hi: int, n: int, targets: list[str], pki: Path, interval: float,
    traces: list[np.ndarray],
) -> None:  # fmt: skip
    # A thousand simulated agents' heap in one process would cost full collections of a second, stalls of
    # every owner's renewals that no real agent (one agent's heap) has: this process collects nothing
    # (it lives minutes).
    gc.freeze()
    gc.disable()
    fleet, stats = Fleet.of(n), Stats()
    agents = [SimAgent(h, fleet, pki, targets, traces, stats) for h in fleet.hosts[lo:hi]]
    by_host = {a.host: a for a in agents}
    dead: dict[str, float] = {}
    for a in agents:
        a.fleet, a.dead = by_host, dead
    tasks = {a.host: asyncio.create_task(a.run(interval)) for a in agents}
    if MODE["observers"] == "agents":
        tasks[""] = asyncio.create_task(observe_forever(agents, dead))
    me = psutil.Process()
    # this process's own loop lag: a vote or a renewal the simulated fleet answers late is the simulator's
    # delay, not the controller's (printed beside the controller's)
    lag = LoopLag()
    lag_at_window = list(lag.counts)
    tasks["lag"] = asyncio.create_task(lag.probe())
    try:
        while True:
            cmd, arg = await asyncio.to_thread(conn.recv)
            reply: Any = None
            if cmd == "status":
                reply = {
                    "connected": sum(a.link.connected for a in agents),
                    "acquires": stats.acquires,
                    "acked": sum(a.seq - a.link.backlog_batches for a in agents),
                    "backlog": sum(a.link.backlog_batches for a in agents),
                    "refused": stats.renew_refused,
                    "failed": stats.renew_failed,
                    "cpu": me.cpu_percent(None),
                    "lag": [a - b for a, b in zip(lag.counts, lag_at_window, strict=True)],
                }
            elif cmd == "window":  # the measured window starts
                lag_at_window = list(lag.counts)
                stats.renew_rtt.clear()
                stats.renew_refused = stats.renew_failed = 0
                me.cpu_percent(None)
            elif cmd == "rtt":
                reply = list(stats.renew_rtt)
            elif cmd == "kill":  # a primary's host dies: its stream and renewals stop
                name, primary, shadow = arg
                tasks.pop(primary).cancel()
                dead[primary] = time.monotonic()
                heir, t_fail = by_host[shadow], time.monotonic()
                while name not in heir.owned and time.monotonic() - t_fail < 30:
                    await asyncio.sleep(0.005)
                reply = time.monotonic() - t_fail if name in heir.owned else float("nan")
            elif cmd == "stop":
                return
            conn.send(reply)
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for a in agents:
            await a.lease_channel.close()


async def simulate(
    n: int, seconds: float, interval: float, work: Path, procs: int, replicas: int = 1, shards: int = 1
) -> str:
    fleet = Fleet.of(n)
    pki = work / "pki"
    server, check_port = await tcp_listener()
    d = work / f"n{n}-r{replicas}"
    d.mkdir()
    (d / "pki").symlink_to(pki)
    # --replicas above 1: one etcd member (the replicas' store, on this machine too) and as many controller
    # processes, each a [cluster] replica; the agents stream to every one (ControllerLinks)
    etcd = EtcdCluster.start(d / "etcd", size=1) if replicas > 1 else None
    cluster = Cluster(etcd, shards) if etcd is not None else None
    names = [f"r{i + 1}" for i in range(replicas)] if cluster else [""]
    ports = [(free_port(), free_port()) for _ in names]
    prof = os.environ.get("FLEET_SIM_PROFILE")  # a path: the controller runs under cProfile, written there
    procs_ctl = []
    for name, (port, metrics_port) in zip(names, ports, strict=True):
        cfg = d / f"controller{name and '-' + name}.toml"
        cfg.write_text(controller_toml(d, fleet, port, metrics_port, check_port, name, cluster))
        profile = ["-m", "cProfile", "-o", f"{prof}.{n}{name}"] if prof else []
        procs_ctl.append(
            spawn(
                [sys.executable, *profile, "-m", "controller.cli", "run", "--config", str(cfg)],
                d / f"controller{name and '-' + name}.log",
            )
        )
    port, metrics_port = ports[0]
    spawned = time.monotonic()
    parts: list[Part] = []
    try:
        for pr, (pt_, _) in zip(procs_ctl, ports, strict=True):
            wait_for_port("127.0.0.1", pt_, 60, pr)
        target = f"127.0.0.1:{port}"
        targets = [f"127.0.0.1:{p}" for p, _ in ports]
        # the fleet in `procs` processes (one Python process cannot simulate 2,000 agents' streams), cut
        # at multiples of 4 hosts so that each service's hosts are in one
        cuts = [4 * round(n * k / procs / 4) for k in range(procs + 1)]
        parts = [Part(lo, hi, n, targets, pki, interval) for lo, hi in itertools.pairwise(cuts) if hi > lo]

        async def status() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(pt.ask("status") for pt in parts)))

        def total(st: list[dict[str, Any]], key: str) -> Any:
            return sum(x[key] for x in st)

        def divided() -> bool:
            """Replicas: every shard acted for, by replicas that each act for some (the ring's division
            waits for members seen 10 s, then each taker hears its agents for a heartbeat timeout)."""
            if cluster is None:
                return True
            try:
                acting = [
                    gauge(scrape(mp_), "shadowplane_controller_replica_shards_acting") for _, mp_ in ports
                ]
            except OSError:
                return False
            return sum(acting) == shards and min(acting) > 0

        # warm-up: every agent connected, every service placed, the controller's first freeze of its heap
        # done (shadowplane/gc_pauses.py: a full collection once, FIRST_FREEZE_SECONDS after it started)
        t_start = time.monotonic()
        st = await status()
        while time.monotonic() - t_start < 180 and (
            total(st, "connected") < n
            or total(st, "acquires") < len(fleet.services)
            or time.monotonic() - spawned < gc_pauses.FIRST_FREEZE_SECONDS + 2
            or not await asyncio.to_thread(divided)
        ):
            await asyncio.sleep(0.5)
            st = await status()
        warm = time.monotonic() - t_start
        connected = total(st, "connected")
        if warm >= 180:  # say what it waited for
            print(
                f"  warm-up cut at {warm:.0f} s: connected {connected}/{n}, "
                f"placed {total(st, 'acquires')}/{len(fleet.services)}, "
                f"shards divided {await asyncio.to_thread(divided)}",
                flush=True,
            )
        ps = [psutil.Process(pr.pid) for pr in procs_ctl]
        for p in ps:
            p.cpu_percent(None)
        await asyncio.gather(*(pt.ask("window") for pt in parts))  # the fleet's CPU is printed too
        acked0 = total(await status(), "acked")
        since_ms = int(time.time() * 1000)
        lag_before = []
        for _, mp_ in ports:
            try:
                lag_before.append(await asyncio.to_thread(scrape, mp_))
            except OSError:
                lag_before.append("")
        await asyncio.sleep(seconds)
        cpus, st = [p.cpu_percent(None) for p in ps], await status()
        sim_cpu, acked1, backlog = total(st, "cpu"), total(st, "acked"), total(st, "backlog")
        sim_lag = [sum(x) for x in zip(*(pt_st["lag"] for pt_st in st), strict=True)]
        refused, failed = total(st, "refused"), total(st, "failed")
        rtt = [x for pt in parts for x in await pt.ask("rtt")]
        rss = max(p.memory_info().rss for p in ps)
        lag_texts = []
        for _, mp_ in ports:
            try:  # off this process's loop, which runs the agents; an overloaded controller may not answer
                lag_texts.append(await asyncio.to_thread(scrape, mp_))
            except OSError as e:
                lag_texts.append(f"# /metrics did not answer: {e}")
        lag_text = lag_texts[0]

        def count() -> int:
            with sqlite3.connect(d / f"controller{names[0] and '-' + names[0]}.db", timeout=30) as db:
                return int(db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

        # the store's bytes per sample, after the run (its size grows in steps: a rate over a minute
        # would measure the steps); a host-day is 3 workloads x a sample per interval
        stored = await asyncio.to_thread(count)
        size = sum(f.stat().st_size for f in d.glob(f"controller{names[0] and '-' + names[0]}.db*"))

        def events() -> list[fpb.Event]:
            tls = TlsConfig(
                ca=pki / "ca.pem", cert=pki / "operator-bench.pem", key=pki / "operator-bench.key"
            )
            with sync_channel(target, tls) as ch:
                req = fpb.ListEventsRequest(limit=10_000)
                return list(fgrpc.FleetStub(ch).ListEvents(req, timeout=60).events)

        try:
            evs = await asyncio.to_thread(events)
            spurious = [e.kind for e in evs if e.unix_ms >= since_ms and e.kind in SPURIOUS]
        except grpc.RpcError as e:  # an overloaded controller
            spurious = [f"unknown: ListEvents failed ({e.code().name if isinstance(e, grpc.Call) else e})"]
        # Then a primary fails under this load: its agent's stream and its renewals stop (as a host that
        # dies). The time until its shadow is told to take the address over.
        name, primary, shadow = fleet.services[len(fleet.services) // 2]
        i = fleet.hosts.index(primary)
        failover = await next(pt for pt in parts if pt.lo <= i < pt.hi).ask("kill", (name, primary, shadow))
        lags = [lag_quantiles(t, b) for t, b in zip(lag_texts, lag_before, strict=True)]
        p50, p99, window_max, mx = lags[0]
        cycle_last, cycle_max = (
            gauge(lag_text, "shadowplane_scaling_cycle_seconds"),
            gauge(lag_text, "shadowplane_scaling_cycle_max_seconds"),
        )
        per_sample = size / max(1, stored)
        growth = per_sample * len(WORKLOADS) * 86_400 / interval / 1e6
        renewals = (
            f"  renewals {len(rtt)}: round trip p50 {pct(rtt, 0.5) * 1000:.1f} "
            f"p99 {pct(rtt, 0.99) * 1000:.1f} max {max(rtt, default=0) * 1000:.0f} ms; "
            f"refused {refused}, failed {failed}"
            if MODE["observers"] == "controller"
            else f"  renewals: with observer agents, none to the controller; {refused} refused"
        )
        if cluster is not None:
            per = "; ".join(
                f"{name} CPU {c:.0f} %, lag p99 {lg[1]} max {lg[2]}"
                for name, c, lg in zip(names, cpus, lags, strict=True)
            )
            head = [
                f"N={n} hosts, {len(fleet.services)} leased services, {replicas} replicas "
                f"({shards} shards, one etcd member): warm-up {warm:.0f} s, {connected} connected to all",
                f"  replicas: {per}; the busiest {max(cpus):.0f} %, all together {sum(cpus):.0f} %",
            ]
        else:
            head = [
                f"N={n} hosts, {len(fleet.services)} leased services: warm-up {warm:.0f} s, "
                f"{connected} connected"
            ]
        cpu = max(cpus)
        return "\n".join(
            [
                *head,
                f"  ingest {(acked1 - acked0) / seconds:.1f} batches/s (sent {n / interval:.1f}), "
                f"backlog {backlog}",
                f"  controller loop lag p50 {p50} p99 {p99} max {window_max} "
                f"(since it started, warm-up included: {mx * 1000:.0f} ms)",
                renewals,
                f"  controller CPU {cpu:.0f} % (the simulated fleet {sim_cpu:.0f} %, its loops' lag p99 "
                f"{bucket_quantile(sim_lag, 0.99)}), "
                f"RSS {rss / 2**20:.0f} MiB; "
                f"store {per_sample:.0f} bytes per sample: {growth:.1f} MB per host-day",
                f"  scaling cycle last {cycle_last * 1000:.0f} ms, max {cycle_max * 1000:.0f} ms",
                f"  spurious lease actions: {len(spurious)} {sorted(set(spurious))}",
                f"  a primary's host dies: its shadow is told to take over after {failover:.2f} s",
            ]
        )
    finally:
        for pt in parts:
            pt.stop()
        server.close()
        for pr in procs_ctl:
            stop(pr)
        if etcd is not None:
            etcd.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[100, 500, 1000, 2000])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured, after every agent connected")
    ap.add_argument("--interval", type=float, default=10.0, help="telemetry interval (shipped: 10 s)")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1],
        help="controller processes, one run per value: 1 is the single controller on SQLite (the embedded "
        "default); above 1, [cluster] replicas on one etcd member, the services divided among them "
        "(needs --observers agents: replicas hold no lease seat)",
    )
    ap.add_argument("--shards", type=int, default=8, help="[cluster] shards with --replicas above 1")
    ap.add_argument(
        "--observers",
        choices=("controller", "agents"),
        default="controller",
        help="who observes each service: the controller alone (its renewals and probes measured), or three "
        "agent hosts (a fleet's configuration: the controller hears their views)",
    )
    ap.add_argument(
        "--shipped-leases",
        action="store_true",
        help="the shipped lease (0.5 s) and renewals (0.1 s), not the lab's",
    )
    ap.add_argument(
        "--fleet-procs",
        type=int,
        default=2,
        help="processes simulating the fleet (one Python process saturates a core near 1,000 agents)",
    )
    args = ap.parse_args()
    if args.shipped_leases:
        TIMINGS.update(lease=0.5, renew=0.1)
    MODE["observers"] = args.observers
    if max(args.replicas) > 1 and args.observers != "agents":
        ap.error("--replicas above 1 needs --observers agents (replicas hold no lease seat)")
    if args.fleet_procs > 1 and any(n % 4 for n in args.hosts):
        ap.error("--hosts: with --fleet-procs > 1, multiples of 4 (a service's 4 hosts stay in one process)")
    lines = [
        f"# bench/fleet_sim.py --hosts {' '.join(map(str, args.hosts))} --seconds {args.seconds:g} "
        f"--replicas {' '.join(map(str, args.replicas))} --shards {args.shards} "
        f"--observers {args.observers}{' --shipped-leases' if args.shipped_leases else ''}, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, the fleet in {args.fleet_procs} processes beside the controller",
        f"agents: 3 workloads each, a batch every {args.interval:g} s (NAB traces), heartbeats 1 s, "
        "mutual TLS; "
        f"a leased service per 4 hosts, lease {TIMINGS['lease']} s renewed every {TIMINGS['renew']} s "
        + (
            "with the controller; the controller's health checks every 0.2 s (shipped)"
            if args.observers == "controller"
            else "with its 3 observer agents (shadow + 2 hosts), which judge its health (0.2 s, fall 3) "
            "and report views; the controller holds no seat and probes nothing"
        )
        + "; controller defaults otherwise",
    ]
    for line in lines:
        print(line, flush=True)
    with tempfile.TemporaryDirectory(prefix="sp-fleet-") as tmp:
        work = Path(tmp)
        pki = work / "pki"
        init_ca(pki, "fleet sim CA")
        issue(pki, "controller", "controller", sans=("127.0.0.1",))
        issue(pki, "bench", "operator")
        for i in range(max(args.hosts)):
            issue(pki, host_name(i), "agent")

        async def every_size() -> None:
            for n in args.hosts:
                for r in args.replicas:
                    line = await simulate(
                        n, args.seconds, args.interval, work, args.fleet_procs, r, args.shards
                    )
                    print(line, flush=True)
                    lines.append(line)
                    if args.out:  # after each run: a bigger one may overload the machine
                        args.out.write_text("\n".join(lines) + "\n")

        asyncio.run(every_size())
    return 0


if __name__ == "__main__":
    sys.exit(main())
