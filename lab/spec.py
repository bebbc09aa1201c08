"""What a lab is made of: hosts, roles, addresses, services and timings, planned by pure functions.

`Spec` is what a caller chooses (how many primaries and shadows, DNS or not, timings); `plan(spec)` turns it
into every host's namespace, addresses and bridge port, and every service's VIP, primary and shadows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PREFIX = "splab-"  # every namespace the lab creates starts with this; `lab down` sweeps by it
SWITCH_NS = PREFIX + "sw"
BRIDGE = "br0"
NET4 = "10.77.0"
NET6 = "fd77:"
CONTROLLER_PORT = 7400
PEER_PORT = 7401
ETCD_CLIENT_PORT = 2379  # the lab's etcd members, one per controller namespace
ETCD_PEER_PORT = 2380
DNS_ZONE = "lab.example."
CGROUP_ROOT = "/splab"

Role = Literal["controller", "client", "primary", "shadow", "dns"]
Failover = Literal["shadowplane", "none"]
MAX_PRIMARIES = 9
MAX_SHADOWS = 9
MAX_CONTROLLERS = 5


class SpecError(ValueError):
    pass


# On 2 cores the lab's controller, three agents, three web servers and the test's client poller and
# split-brain checker share the CPUs: each step of a failover (probe result, report, loop tick, vote,
# acquire, announcement) may start a few ms late. 100 ms covers that on the slower of the 2-core VMs the
# suite runs on (about 4 x slower than others; there the test suite also builds the VM image beside the
# lab, and one failover came 63 ms over the rest of the bound), and stays small next to the 2.3 s a lab
# failover takes (mostly the wait for a cut-off owner's address to expire).
SCHEDULING_MARGIN_SECONDS = 0.1


@dataclass(frozen=True)
class Timings:
    """Failure detection and movement timings. The lab runs the shipped health checks with a shorter
    lease (its failover takes the 2.25 s address wait of a 0.25 s lease), and faster heartbeats,
    placement and scaling so that a test or demo does not wait for them."""

    lease_seconds: float = 0.25
    renew_interval_seconds: float = 0.05
    heartbeat_timeout_seconds: float = 0.5
    loop_interval_seconds: float = 0.02
    placement_grace_seconds: float = 3.0  # primaries connect within a second or two in the lab
    scaling_interval_seconds: float = 2.0  # a lab minute is a couple of seconds
    # In the model's time (a lab step is one 300 s model step): two steps, so a demo or a test sees a limit
    # come down within seconds; production holds 4 h (`lab up --lower-hold 14400` replays with that).
    scaling_lower_hold_seconds: float = 600.0
    # No change budget: a lab day (288 steps) outlasts a demo or a test, whose limit must come down again;
    # production allows 7 changes a day (`lab up --max-changes-per-day 7` replays with that).
    scaling_max_changes_per_day: int = 0
    agent_interval_seconds: float = 1.0
    agent_heartbeat_interval_seconds: float = 0.05
    agent_reconnect_max_seconds: float = 0.5
    failback_hold_seconds: float = 5.0
    flap_window_seconds: float = 0.0
    garp_count: int = 3
    garp_interval_seconds: float = 0.02
    # The shipped health checks: the fault-injection suite saw the owner's web server, starved by CPU
    # saturation, miss two 100 ms deadlines in a row (a false failover) with faster ones, and their
    # detection (0.82 s) costs nothing here: a cut-off owner's address wait (2.25 s) is longer.
    health_interval_seconds: float = 0.2
    health_timeout_seconds: float = 0.2
    health_fall: int = 3
    health_rise: int = 2
    hook_timeout_seconds: float = 5.0

    def max_failover_outage_seconds(self, client_poll_interval: float = 0.01) -> float:
        """The longest outage a client polling the VIP every `client_poll_interval` (the lab poller's
        default) may see when the owner's link is cut: from the last answer before the cut to the first
        after the takeover, as `lab.poller.outages` measures it. Derived from these timings as the
        controller and the agents use them (controller/failover/, agentd/failover.py)."""
        # only here: the orchestrator pulls in grpc, and this module is imported by the lab's light tools
        from controller.failover.orchestrator import VOTE_SAFETY_MS
        from shadowplane.healthcheck import detection_seconds
        from shadowplane.lease import address_expiry_seconds

        # The last answer before the cut can be from a request sent up to one poll interval earlier.
        last_answer = client_poll_interval
        # Detection: the first failing probe starts within one check interval of the cut, `fall` failures
        # in a row make the owner down and the last of them fails at its timeout. Observers report a change
        # at once; the HA loop decides on its next tick.
        detection = (
            detection_seconds(self.health_fall, self.health_interval_seconds, self.health_timeout_seconds)
            + self.loop_interval_seconds
        )
        # Fencing: the observers granted the cut owner's last renewal at the cut at the latest. The cut owner
        # cannot confirm it let go (it might be hung, not cut off), so the new owner waits until its address
        # has certainly expired in its kernel: one lease after that grant, plus the address's lifetime and
        # the kernel's once-a-second check (rounded up to the ms). The vote starts after detection, so the
        # later of the two counts; then the orchestrator's margin for the vote replies.
        fenced = self.lease_seconds + address_expiry_seconds(self.lease_seconds) + 0.001
        takeover = max(detection, fenced) + VOTE_SAFETY_MS / 1000
        # Acquire: the new owner's first renewal round (each renewal times out after a renew interval)
        # comes before it adds the address and sends its first gratuitous ARP / unsolicited NA.
        acquire = self.renew_interval_seconds
        # The client's first request after that announcement.
        first_answer = client_poll_interval
        return last_answer + takeover + acquire + first_answer + SCHEDULING_MARGIN_SECONDS


def _defaults(cls: type[Any]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def shipped_timings(base: Timings | None = None) -> Timings:
    """`base` (the lab's timings) with everything that paces detection and failover taken from the shipped
    config defaults, read from the config dataclasses: the lease, renewals, the controller's loop and
    heartbeat timeout, the health checks, the announcements, the agent's heartbeats and reconnects. The
    rest (failback hold, flap window, telemetry interval, placement grace) stays the lab's, so the same
    runs can repeat a failover every few seconds."""
    # only here: the daemons' configs are not what the lab's light tools need to import
    from agentd.config import AgentConfig
    from controller.config import FailoverConfig, HealthCheckConfig, ServiceConfig

    fo, hc, svc, agent = (
        _defaults(FailoverConfig),
        _defaults(HealthCheckConfig),
        _defaults(ServiceConfig),
        _defaults(AgentConfig),
    )
    return dataclasses.replace(
        base or Timings(),
        lease_seconds=fo["lease_seconds"],
        renew_interval_seconds=fo["renew_interval_seconds"],
        heartbeat_timeout_seconds=fo["heartbeat_timeout_seconds"],
        loop_interval_seconds=fo["loop_interval_seconds"],
        health_interval_seconds=hc["interval_seconds"],
        health_timeout_seconds=hc["timeout_seconds"],
        health_fall=hc["fall"],
        health_rise=hc["rise"],
        garp_count=svc["garp_count"],
        garp_interval_seconds=svc["garp_interval_seconds"],
        agent_heartbeat_interval_seconds=agent["heartbeat_interval_seconds"],
        agent_reconnect_max_seconds=agent["reconnect_max_seconds"],
    )


def timings_text(t: Timings) -> str:
    """The timings that decide a failover, in one line (benchmarks and `lab chaos` print it)."""
    return (
        f"lease {t.lease_seconds:g} s, renew every {t.renew_interval_seconds:g} s, health checks every"
        f" {t.health_interval_seconds:g} s (timeout {t.health_timeout_seconds:g} s, fall {t.health_fall},"
        f" rise {t.health_rise}), heartbeat timeout {t.heartbeat_timeout_seconds:g} s, HA loop every"
        f" {t.loop_interval_seconds:g} s"
    )


@dataclass(frozen=True)
class Spec:
    primaries: int = 1
    shadows: int = 2
    dns: bool = False  # a BIND server in splab-dns taking the controller's RFC 2136 updates
    ipv6_vips: bool = False  # VIPs fd77::101... instead of 10.77.0.101...
    # "none": namespaces and web servers only, no controller or agents (e.g. to run keepalived instead)
    failover: Failover = "shadowplane"
    failback: Literal["auto", "manual", "never"] = "auto"
    hook_failure: Literal["abort", "continue"] = "abort"
    agent_bpf: bool = False  # BPF capture compiles per agent (seconds of CPU each); failover needs none
    # Mutual TLS, as production runs, unless this is set: every daemon and the lab's own calls then run
    # without certificates (`python -m lab up --plaintext`)
    plaintext: bool = False
    http_port: int = 8080
    # Controller replicas: 1 is the single controller on SQLite; 3 or 5 start as many etcd members and
    # replicas, one of each per controller namespace (ctl, ctl2, ...), as `[cluster]` runs them
    controllers: int = 1
    shards: int = 1  # [cluster] shards: above 1, the services are divided among the replicas
    # Availability zones: 2 alternates primaries and shadows between az1 and az2 (p1 az1, s1 az2, ...); 3
    # puts p_i and s_i in az((i - 1) % 3 + 1), so that a zone holds a primary and some of its shadows
    zones: int = 2
    # Every service's observers (empty: the controller's default, the controller and every shadow); e.g.
    # one per zone, so that a zone's failure leaves a majority to judge the other zones' hosts ready
    observers: tuple[str, ...] = ()
    timings: Timings = field(default_factory=Timings)
    workdir: Path | None = None  # None: a fresh directory under /run/shadowplane-lab
    startup_timeout_seconds: float = 30.0

    def validate(self) -> str | None:
        if not 1 <= self.primaries <= MAX_PRIMARIES:
            return f"primaries: must be 1..{MAX_PRIMARIES}, got {self.primaries}"
        if not 1 <= self.shadows <= MAX_SHADOWS:
            return f"shadows: must be 1..{MAX_SHADOWS}, got {self.shadows}"
        if not 1 <= self.controllers <= MAX_CONTROLLERS:
            return f"controllers: must be 1..{MAX_CONTROLLERS}, got {self.controllers}"
        if self.controllers > 1 and self.shadows < 2:
            return (
                "shadows: replicas hold no lease seat, so each service's quorum is its primary and shadows: "
                "at least 2 shadows with controllers > 1"
            )
        if self.zones not in (2, 3):
            return f"zones: 2 or 3, got {self.zones}"
        if self.shards != 1 and (self.controllers == 1 or not 1 <= self.shards <= 256):
            return f"shards: 1, or 2..256 with controllers > 1, got {self.shards}"
        if self.controllers > 1 and self.failover != "shadowplane":
            return "controllers: replicas need failover = shadowplane"
        if not 1 <= self.http_port <= 65535 or self.http_port in (CONTROLLER_PORT, PEER_PORT, 53):
            return f"http_port: must be a free port 1..65535 (not 53, 7400, 7401), got {self.http_port}"
        t = self.timings
        if t.renew_interval_seconds * 2 > t.lease_seconds:
            return "timings: renew_interval_seconds must be at most half of lease_seconds"
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["workdir"] = str(self.workdir) if self.workdir else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        tknown = {f.name for f in dataclasses.fields(Timings)}
        kw["timings"] = Timings(**{k: v for k, v in (d.get("timings") or {}).items() if k in tknown})
        kw["workdir"] = Path(d["workdir"]) if d.get("workdir") else None
        kw["observers"] = tuple(d.get("observers") or ())
        return cls(**kw)


@dataclass(frozen=True)
class HostPlan:
    name: str
    role: Role
    namespace: str
    ipv4: str
    ipv6: str
    bridge_port: str  # its veth peer in the switch namespace, attached to the bridge
    zone: str = ""

    @property
    def addresses(self) -> list[str]:
        return [f"{self.ipv4}/24", f"{self.ipv6}/64"]


@dataclass(frozen=True)
class ServicePlan:
    name: str
    vip: str  # with prefix, as the controller config wants it
    primary: str
    shadows: tuple[str, ...]

    @property
    def vip_ip(self) -> str:
        return self.vip.split("/")[0]

    @property
    def dns_name(self) -> str:
        return f"{self.name}.{DNS_ZONE}"

    def cgroup(self, host: str) -> str:
        return workload_cgroup(host, self.name)


@dataclass(frozen=True)
class Plan:
    spec: Spec
    hosts: tuple[HostPlan, ...]
    services: tuple[ServicePlan, ...]

    def host(self, name: str) -> HostPlan:
        name = "ctl" if name == "controller" else name
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no lab host {name!r}; hosts: {', '.join(h.name for h in self.hosts)}")

    def service(self, name: str) -> ServicePlan:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(f"no lab service {name!r}; services: {', '.join(s.name for s in self.services)}")

    @property
    def controller_address(self) -> str:
        return f"{self.host('ctl').ipv4}:{CONTROLLER_PORT}"

    def controller_hosts(self) -> list[HostPlan]:
        """The controller's namespace, or every replica's (ctl first)."""
        return [h for h in self.hosts if h.role == "controller"]

    @property
    def controller_addresses(self) -> list[str]:
        return [f"{h.ipv4}:{CONTROLLER_PORT}" for h in self.controller_hosts()]

    def fleet_hosts(self) -> list[HostPlan]:
        """Hosts that run an agent and a web server: primaries and shadows."""
        return [h for h in self.hosts if h.role in ("primary", "shadow")]

    def workloads(self, host: str) -> list[tuple[ServicePlan, Literal["primary", "shadow"]]]:
        out: list[tuple[ServicePlan, Literal["primary", "shadow"]]] = []
        for s in self.services:
            if s.primary == host:
                out.append((s, "primary"))
            elif host in s.shadows:
                out.append((s, "shadow"))
        return out


def workload_cgroup(host: str, service: str) -> str:
    return f"{CGROUP_ROOT}/{host}/{service}"


def _host(name: str, role: Role, octet: int, zone: str = "") -> HostPlan:
    # fd77::<octet> reuses the IPv4 octet's decimal digits, so 10.77.0.11 is fd77::11: easy to read
    return HostPlan(name, role, PREFIX + name, f"{NET4}.{octet}", f"{NET6}:{octet}", f"{name}-port", zone)


def plan(spec: Spec) -> Plan:
    problem = spec.validate()
    if problem:
        raise SpecError(problem)
    hosts = [_host("ctl", "controller", 2), _host("client", "client", 3)]
    for i in range(2, spec.controllers + 1):
        hosts.append(_host(f"ctl{i}", "controller", 2 + i))  # ctl2 = .4 ... ctl5 = .7
    for i in range(1, spec.primaries + 1):
        zone = f"az{(i - 1) % 3 + 1}" if spec.zones == 3 else ("az1" if i % 2 else "az2")
        hosts.append(_host(f"p{i}", "primary", 10 + i, zone))
    for i in range(1, spec.shadows + 1):
        zone = f"az{(i - 1) % 3 + 1}" if spec.zones == 3 else ("az2" if i % 2 else "az1")
        hosts.append(_host(f"s{i}", "shadow", 20 + i, zone))
    if spec.dns:
        hosts.append(_host("dns", "dns", 53))
    shadows = tuple(f"s{i}" for i in range(1, spec.shadows + 1))
    services = []
    for i in range(1, spec.primaries + 1):
        name = "web" if spec.primaries == 1 else f"web{i}"
        vip = f"{NET6}:{100 + i}/64" if spec.ipv6_vips else f"{NET4}.{100 + i}/24"
        services.append(ServicePlan(name, vip, f"p{i}", shadows))
    return Plan(spec, tuple(hosts), tuple(services))
