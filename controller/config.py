"""The controller's TOML configuration (/etc/shadowplane/controller.toml)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import dns.exception
import dns.name
import dns.tsig

from controller.predict.allocation import AllocationPolicy
from controller.scaling.rule import RuleParams
from shadowplane.config import (
    at_least,
    between,
    check,
    host_port,
    load,
    non_empty,
    non_negative,
    positive,
    repeated,
    valid_name,
)
from shadowplane.healthcheck import ExecCheckConfig, exec_check_names
from shadowplane.lease import majority
from shadowplane.prometheus import MetricsConfig
from shadowplane.tls import TlsConfig

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def ip_address(v: str) -> str | None:
    if not v:
        return None
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"must be an IP address, got {v!r}"
    return None


def ip_interface(v: str) -> str | None:
    if "/" not in v:
        return f"must be ADDRESS/PREFIX (e.g. 10.0.0.100/24), got {v!r}"
    try:
        ipaddress.ip_interface(v)
    except ValueError:
        return f"must be ADDRESS/PREFIX (e.g. 10.0.0.100/24), got {v!r}"
    return None


@dataclass
class StoreConfig:
    path: Path = field(
        default=Path("/var/lib/shadowplane/controller.db"), metadata=check(doc="SQLite database file")
    )
    retention_hours: float = field(
        default=168.0,
        metadata=check(
            positive, doc="history older than this is deleted (the forecaster's reaches back a day)"
        ),
    )
    # 2 h of full samples for 1,000 hosts is about 1.75 GB (800 bytes a sample); a week of steps 0.5 GB.
    raw_hours: float = field(
        default=2.0,
        metadata=check(
            positive,
            doc="full samples (every field an agent sends, for `shadowctl top` and the Fleet API) are kept "
            "this long; older ones are folded into one row per workload per forecast step, which the "
            "forecaster and training read as the samples themselves",
        ),
    )

    def validate(self) -> str | None:
        if self.raw_hours > self.retention_hours:
            return (
                f"raw_hours: must be at most retention_hours ({self.retention_hours:g}), got "
                f"{self.raw_hours:g}: samples are kept as steps for the rest of the retention"
            )
        return None


@dataclass
class HostEntry:
    name: str = field(metadata=check(valid_name, doc="host name, as its agent reports it"))
    zone: str = field(default="", metadata=check(doc="availability zone"))
    address: str = field(
        default="",
        metadata=check(ip_address, doc="the host's address on the service network (health checks)"),
    )
    # The resource pool's view of the host (docs/pool.md): what it holds and what it costs.
    cores: float = field(
        default=0.0,
        metadata=check(
            non_negative, doc="CPU cores the resource pool counts on (0: what the host's agent reports)"
        ),
    )
    memory_gib: float = field(
        default=0.0,
        metadata=check(
            non_negative, doc="memory in GiB the resource pool counts on (0: what the agent reports)"
        ),
    )
    price_per_hour: float = field(
        default=0.0,
        metadata=check(
            non_negative,
            doc="what an hour of this host costs, in one currency for the whole fleet (0 on every host: "
            "every core costs the same, and the pool's plan reserves the fewest cores)",
        ),
    )
    perf_class: str = field(
        default="", metadata=check(doc='a performance class (e.g. "fast") a service may ask its shadow for')
    )
    labels: dict[str, str] = field(
        default_factory=dict,
        metadata=check(
            doc='labels, e.g. { rack = "r12" }: a service\'s spread_by keeps its shadow apart by them'
        ),
    )
    shadow_pool: bool = field(
        default=True, metadata=check(doc="the resource pool may place other services' shadows here")
    )


@dataclass
class HealthCheckConfig:
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "command": "is no longer accepted: the controller never sends a command line to run. Name a check "
        'instead (check = "NAME") and give its command on each observing host, as [checks.NAME] '
        "command = [...] in /etc/shadowplane/agentd.toml (and in controller.toml if the controller observes "
        "the service)"
    }

    kind: Literal["tcp", "http", "exec"] = field(
        default="tcp",
        metadata=check(doc="tcp: connect; http: GET with expected status; exec: the observer's own command"),
    )
    port: int = field(default=80, metadata=check(between(1, 65535), doc="port of the service on its host"))
    path: str = field(default="/", metadata=check(doc="http: the path to GET"))
    expect_status: int = field(
        default=200, metadata=check(between(100, 599), doc="http: the status that means up")
    )
    # Detection (fall x interval + timeout, about 0.8 s) stays below the fencing wait a cut-off owner costs
    # anyway (lease + address lifetime + 1 s, 2.5 s): faster checks would buy nothing but false alarms.
    interval_seconds: float = field(default=0.2, metadata=check(at_least(0.01), doc="seconds between probes"))
    timeout_seconds: float = field(
        default=0.2, metadata=check(at_least(0.01), doc="a probe slower than this fails")
    )
    fall: int = field(
        default=3, metadata=check(between(1, 100), doc="consecutive failures that make a target down")
    )
    rise: int = field(default=2, metadata=check(between(1, 100), doc="consecutive successes that make it up"))
    # Last: from here on `check` in this class body is this field, no longer the metadata function.
    check: str = field(
        default="",
        metadata=check(
            lambda v: valid_name(v) if v else None,
            doc="exec: the name of the [checks.NAME] each observer runs, from its own config",
        ),
    )

    def validate(self) -> str | None:
        if self.kind == "exec" and not self.check:
            return (
                'check: an exec check names a check (check = "NAME") that each observing host defines as '
                "[checks.NAME] in its own config"
            )
        if self.kind != "exec" and self.check:
            return f'check: only an exec check names a check; kind is "{self.kind}"'
        return None


@dataclass
class DnsConfig:
    server: str = field(
        metadata=check(
            host_port,
            doc="authoritative DNS server HOST:PORT taking RFC 2136 updates (an IP address: a name would be "
            "resolved at every update)",
        )
    )
    zone: str = field(metadata=check(non_empty, doc="zone to update, e.g. lab.example."))
    name: str = field(metadata=check(non_empty, doc="record to point at the owner, e.g. web.lab.example."))
    ttl: int = field(
        default=30,
        metadata=check(
            between(0, 86400), doc="TTL of the record: resolvers may keep the old owner's address this long"
        ),
    )
    tsig_name: str = field(default="", metadata=check(doc="TSIG key name (empty: unsigned updates)"))
    tsig_secret: str = field(default="", metadata=check(doc="TSIG key, base64"))
    tsig_algorithm: str = field(default="hmac-sha256", metadata=check(doc="TSIG algorithm"))
    timeout_seconds: float = field(
        default=2.0, metadata=check(positive, doc="seconds to wait for the server")
    )

    def server_host_port(self) -> tuple[str, int]:
        """The server's host (an IP address or a host name) and port; ValueError "server: ..." otherwise."""
        host, _, port = self.server.rpartition(":")
        host = host.strip("[]")  # "[::1]:53" as well as "::1:53"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"server: must be HOST:PORT (e.g. 192.0.2.53:53), got {self.server!r}")
        numeric_end = host.rstrip(".").rpartition(".")[2].isdigit()  # no top-level domain is all digits
        if ip_address(host) is not None and (not _HOST_NAME.match(host) or numeric_end):
            raise ValueError(
                f"server: {host!r} is neither an IP address nor a host name: use the DNS server's IP "
                "address, e.g. 192.0.2.53:53"
            )
        return host, int(port)

    def names(self) -> tuple[dns.name.Name, dns.name.Name]:
        """(zone, record name), both absolute; ValueError "zone: ..." or "name: ..." when they are not valid
        or the name is not inside the zone (the server would answer NOTZONE at the first failover)."""
        try:
            zone = dns.name.from_text(self.zone)
        except dns.exception.DNSException as e:
            raise ValueError(
                f"zone: {self.zone!r} is not a valid DNS name ({e}): e.g. lab.example."
            ) from None
        try:
            name = dns.name.from_text(self.name, origin=None)
        except dns.exception.DNSException as e:
            raise ValueError(
                f"name: {self.name!r} is not a valid DNS name ({e}): e.g. web.lab.example."
            ) from None
        if not name.is_absolute():
            # "web.lab.example" without its final dot means that absolute name; a plain "web" is relative to
            # the zone.
            as_absolute = name.concatenate(dns.name.root)
            name = as_absolute if as_absolute.is_subdomain(zone) else name.concatenate(zone)
        if not name.is_subdomain(zone):
            raise ValueError(
                f"name: {name} is not inside zone {zone}: the server would answer NOTZONE: fix name or zone"
            )
        return zone, name

    def tsig_key(self) -> dns.tsig.Key | None:
        """The TSIG key (None: unsigned updates); ValueError "tsig_...: ..." when the settings cannot sign."""
        if not self.tsig_name:
            if self.tsig_secret:
                raise ValueError(
                    "tsig_name: empty, but tsig_secret is set: give the key's name (as in the server's key "
                    "statement), or remove tsig_secret for unsigned updates"
                )
            return None
        if not self.tsig_secret:
            raise ValueError(
                f"tsig_secret: empty, but tsig_name is {self.tsig_name!r}: set the key's secret (base64, "
                "from the server's key statement)"
            )
        try:
            secret = base64.b64decode(self.tsig_secret, validate=True)
        except binascii.Error:
            secret = b""
        if not secret:
            raise ValueError("tsig_secret: not valid base64: copy the secret from the server's key statement")
        # BIND spells it hmac-md5; on the wire (and in dnspython) it is HMAC-MD5.SIG-ALG.REG.INT.
        md5 = self.tsig_algorithm.lower().rstrip(".") == "hmac-md5"
        try:
            key = dns.tsig.Key(self.tsig_name, secret, dns.tsig.HMAC_MD5 if md5 else self.tsig_algorithm)
        except dns.exception.DNSException as e:
            raise ValueError(
                f"tsig_name: {self.tsig_name!r} / tsig_algorithm {self.tsig_algorithm!r}: not a valid DNS "
                f"name ({e})"
            ) from None
        # An unknown algorithm would otherwise only fail while signing, in the middle of a failover.
        if key.algorithm not in dns.tsig.mac_sizes or key.algorithm == dns.tsig.GSS_TSIG:
            raise ValueError(
                f"tsig_algorithm: {self.tsig_algorithm!r} is not supported: use the server key's algorithm "
                "(hmac-sha256, hmac-sha512, hmac-sha1, ...)"
            )
        return key

    def validate(self) -> str | None:
        try:
            self.server_host_port()
            self.names()
            self.tsig_key()
        except ValueError as e:
            return str(e)
        return None


@dataclass
class ServiceConfig:
    name: str = field(metadata=check(valid_name, doc="service name (workloads name it in `service`)"))
    primary: str = field(metadata=check(valid_name, doc="host that owns the service when healthy"))
    shadows: list[str] = field(
        default_factory=list,
        metadata=check(
            doc="hosts that take over, in order (empty: no failover; the primary is watched, its demand "
            "forecast and captured, and nothing moves)"
        ),
    )
    observers: list[str] = field(
        default_factory=list,
        metadata=check(
            doc='who votes on failure and leases: host names and/or "controller" (default: '
            "the controller and every shadow; with one shadow the primary also votes on leases, so that a "
            "controller restart never costs the owner its majority)"
        ),
    )
    vip: str = field(
        default="",
        metadata=check(
            doc="virtual IP with prefix, e.g. 10.0.0.100/24 (empty: DNS only; a service with shadows needs "
            "a vip, a [service.dns], or both)"
        ),
    )
    garp_count: int = field(
        default=3, metadata=check(between(0, 100), doc="gratuitous ARPs / NAs after a move")
    )
    garp_interval_seconds: float = field(
        default=0.05, metadata=check(positive, doc="seconds between gratuitous ARPs / NAs")
    )
    failback: Literal["auto", "manual", "never"] = field(
        default="auto",
        metadata=check(doc="when the primary is healthy again: move back by itself, on request, never"),
    )
    failback_hold_seconds: float = field(
        default=60.0,
        metadata=check(non_negative, doc="the primary must be healthy this long before failback"),
    )
    flap_window_seconds: float = field(
        default=300.0, metadata=check(non_negative, doc="at most one failover per window, unless forced")
    )
    hook_timeout_seconds: float = field(
        default=30.0, metadata=check(positive, doc="a hook running longer fails")
    )
    hook_failure: Literal["abort", "continue"] = field(
        default="abort",
        metadata=check(doc="a failing before-hook aborts the transition, or is only reported"),
    )
    # The resource pool (docs/pool.md): how this service's shadow is placed and reserved for.
    tier: Literal["dedicated", "shared", "cold"] = field(
        default="shared",
        metadata=check(
            doc="dedicated: a shadow host of its own; shared: a shadow on a host that backs others too, "
            "sized to the forecast all along; cold: shared, held at the scaling floor until it takes the "
            "service over or its primary's zone is degraded (then sized to the forecast at once)"
        ),
    )
    spread_by: list[str] = field(
        default_factory=list,
        metadata=check(
            doc='host label keys (e.g. ["rack"]) whose value the pool keeps different between this '
            "service's primary and its shadow, besides the zone"
        ),
    )
    shadow_class: str = field(
        default="",
        metadata=check(doc="a perf_class the pool's shadow for this service must have (empty: any)"),
    )
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    dns: DnsConfig | None = field(
        default=None, metadata=check(doc="[service.dns]: RFC 2136 record switching")
    )

    def validate(self) -> str | None:
        # A service without shadows is a trial or a watched-only service: nothing moves, so it needs no vip
        # or DNS record; one with shadows needs something that moves to them.
        if self.shadows and not self.vip and self.dns is None:
            return (
                "vip: a service with shadows needs a vip, a [service.dns] section, or both (what moves to "
                "a shadow); or leave shadows empty for no failover"
            )
        if self.vip:
            problem = ip_interface(self.vip)
            if problem:
                return f"vip: {problem}"
        if self.primary in self.shadows:
            return f"shadows: the primary {self.primary!r} cannot be its own shadow"
        return None

    def observer_names(self) -> list[str]:
        """Who judges the service's hosts (health, renewals) and votes on its leases."""
        return self.observers or ["controller", *self.shadows]

    def lease_quorum(self, replicas: bool = False) -> list[str]:
        """Who votes on the service's leases and grants its owner's renewals: the observers, and by default
        with one shadow the primary too, as a witness. [controller, shadow] needs both for a majority, so
        the controller's own restart (every package upgrade) would cost the owner its lease and the VIP;
        with the primary, two of three remain. The witness judges no host's health: a failed primary cannot
        vouch for the shadow it fails over to, so failure detection stays with the observers.

        With `replicas` ([cluster]) no controller holds a seat: an observer's promise (the newest token it
        voted for) must be one memory, and several processes answering for one seat are several. The
        quorum is then the observer hosts with the primary as a witness; "controller" still judges health
        (the leading replica's own checks: a judgement needs no memory)."""
        if replicas:
            hosts = [o for o in self.observer_names() if o != "controller"]
            return hosts if self.primary in hosts else [self.primary, *hosts]
        if not self.observers and len(self.shadows) == 1:
            return ["controller", self.primary, *self.shadows]
        return self.observer_names()

    def quorum_problem(self) -> str | None:
        """Why losing the controller (a restart, a package upgrade) would drop this service's VIP: its
        observers without the controller are not a majority. None when they are, or nothing moves."""
        names = self.lease_quorum()
        if not self.shadows or "controller" not in names:
            return None
        if len(names) - 1 >= majority(len(names)):
            return None
        example = ["controller", self.primary, *self.shadows]
        return (
            f"observers: {names} need the controller for a majority, so every controller restart (a package "
            f"upgrade) drops the VIP; add hosts (e.g. observers = {example}) or leave observers unset"
        )


@dataclass
class FailoverConfig:
    # The shipped timings are the fastest the fault-injection suite (`python -m lab chaos`) shows safe, with
    # room: 5 renewals per lease, and an address lifetime of 1 s (the kernel's smallest).
    lease_seconds: float = field(
        default=0.5,
        metadata=check(between(0.05, 600), doc="an owner that cannot renew for this long has lost the VIP"),
    )
    renew_interval_seconds: float = field(
        default=0.1, metadata=check(positive, doc="how often an owner renews its lease with the observers")
    )
    drift_margin: float = field(
        default=0.05,
        metadata=check(
            between(0, 0.5), doc="fraction of the lease an owner gives up early (clock rate, scheduling)"
        ),
    )
    heartbeat_timeout_seconds: float = field(
        default=3.0,
        metadata=check(positive, doc="an agent silent this long counts as down for the controller"),
    )
    placement_grace_seconds: float = field(
        default=10.0,
        metadata=check(
            non_negative,
            doc="after the controller starts, wait this long for primaries before "
            "placing an unowned service on a shadow",
        ),
    )
    loop_interval_seconds: float = field(
        default=0.05, metadata=check(positive, doc="how often the HA loop reads state and decides")
    )

    def validate(self) -> str | None:
        if self.renew_interval_seconds * 2 > self.lease_seconds:
            return "renew_interval_seconds: must be at most half of lease_seconds, to survive a lost renewal"
        return None


@dataclass
class PoolConfig:
    demand_quantile: float = field(
        default=0.95,
        metadata=check(
            between(0.5, 0.999),
            doc="each service is reserved for this quantile of its forecast demand, at its peak over the "
            "model's horizon",
        ),
    )
    cover_zones: bool = field(
        default=True,
        metadata=check(doc="reserve for every single-zone failure, not only every single-host failure"),
    )
    max_moves: int = field(
        default=10,
        metadata=check(
            non_negative,
            doc="shadows a re-plan may move to save money (each move costs a warm-up); moves that keep a "
            "failure covered are not counted",
        ),
    )
    time_limit_seconds: float = field(
        default=5.0, metadata=check(between(0.5, 600), doc="the solver's time for one plan")
    )
    zone_degraded_share: float = field(
        default=0.5,
        metadata=check(
            between(0.01, 1.0),
            doc="a zone with at least this share of its hosts down or cut off is degraded: no failover, "
            "failback or placement lands there while a host elsewhere is ready (shadowctl zones)",
        ),
    )
    zone_degraded_min_hosts: int = field(
        default=2,
        metadata=check(
            at_least(1),
            doc="and at least this many hosts down (in a zone of two, one host down is that host's failure, "
            "not the zone's)",
        ),
    )


@dataclass
class ScalingConfig:
    enabled: bool = field(default=True, metadata=check(doc="size shadows from the primaries' forecasts"))
    interval_seconds: float = field(
        default=60.0, metadata=check(between(1, 3600), doc="seconds between scaling cycles (1 s for demos)")
    )
    forecast_step_seconds: float = field(
        default=0.0,
        metadata=check(
            non_negative,
            doc="real seconds of one forecast step (0: the model's own step, 300 s for the packaged model); "
            "shorter compresses time for labs and demos: the model still takes a step for one of its own",
        ),
    )
    model: str = field(default="", metadata=check(doc="ONNX forecast model (empty: the packaged default)"))
    target_coverage: float = field(
        default=0.993,
        metadata=check(between(0.51, 0.9999), doc="share of steps the forecast target should cover"),
    )
    lower_hold_seconds: float = field(
        default=4 * 3600.0,
        metadata=check(
            non_negative,
            doc="a limit is lowered only this long after its last change (raises are never held back): at "
            "most a few changes per workload-day",
        ),
    )
    max_changes_per_day: int = field(
        default=7,
        metadata=check(
            between(0, 10000),
            doc="a limit is lowered only while it changed fewer than this many times less one in the last "
            "day (of forecast steps): the day's last change is kept for a raise, which is never held back "
            "(0: no budget)",
        ),
    )
    # The seed rule's parameters; their defaults are the rule's own (controller/scaling/rule.py).
    up_threshold: float = field(
        default=RuleParams.up_threshold,
        metadata=check(at_least(1), doc="predicted above allocation x this: add"),
    )
    up_factor: float = field(
        default=RuleParams.up_factor, metadata=check(positive, doc="add (predicted - allocation) x this")
    )
    down_threshold: float = field(
        default=RuleParams.down_threshold,
        metadata=check(between(0, 1), doc="predicted below allocation x this: remove"),
    )
    down_factor: float = field(
        default=RuleParams.down_factor,
        metadata=check(between(0, 1), doc="remove (allocation - predicted) x this"),
    )
    cpu_floor_cores: float = field(
        default=0.1, metadata=check(non_negative, doc="never size a shadow below this")
    )
    cpu_ceiling_cores: float = field(
        default=0.0, metadata=check(non_negative, doc="never above this (0: host cores)")
    )
    memory_floor_bytes: int = field(default=64 * 2**20, metadata=check(non_negative, doc="memory floor"))
    # An OOM kill costs more than slack: memory is never sized below what is used now, plus a guard, and
    # comes down slowly (CPU limits only throttle, so CPU follows the rule as it is).
    memory_guard: float = field(
        default=0.2,
        metadata=check(
            between(0, 10),
            doc="a memory limit stays at least (memory in use, by the shadow or by the demand's last step) x "
            "(1 + this)",
        ),
    )
    memory_lower_step: float = field(
        default=0.1,
        metadata=check(between(0, 1), doc="a memory limit comes down by at most this share per step"),
    )
    memory_ceiling_bytes: int = field(
        default=0, metadata=check(non_negative, doc="memory ceiling (0: the host's memory)")
    )
    io_weight: bool = field(default=True, metadata=check(doc="also set I/O weight where the kernel has it"))
    command_timeout_seconds: float = field(
        default=5.0,
        metadata=check(positive, doc="an agent that does not apply limits within this is not ready"),
    )

    def rule_params(self) -> RuleParams:
        """The seed rule as configured: what the scaling loop runs and the backtest replays."""
        return RuleParams(self.up_threshold, self.up_factor, self.down_threshold, self.down_factor)

    def allocation_policy(self) -> AllocationPolicy:
        """The forecast-to-target policy as configured: what the scaling loop runs and the backtest replays.
        A series starts with misses priced high (conservative) and earns its way down as covered steps
        accumulate: a shadow may have to take over in its first hour."""
        return AllocationPolicy(target_coverage=self.target_coverage, initial_price=1.0)

    def validate(self) -> str | None:
        if self.cpu_ceiling_cores and self.cpu_ceiling_cores < self.cpu_floor_cores:
            return "cpu_ceiling_cores: must not be below cpu_floor_cores"
        if self.memory_ceiling_bytes and self.memory_ceiling_bytes < self.memory_floor_bytes:
            return "memory_ceiling_bytes: must not be below memory_floor_bytes"
        return None


def etcd_endpoints(v: list[str]) -> str | None:
    if not v:
        return 'must name the etcd members, e.g. ["https://10.0.0.11:2379", ...]'
    for url in v:
        if not re.match(r"^https?://[^/:]+:[0-9]{1,5}/?$", url):
            return f"{url!r}: an etcd endpoint is https://HOST:PORT (or http:// when asked for)"
    return None


@dataclass
class ClusterConfig:
    """Replicas of the controller sharing an etcd cluster (docs/cluster.md). Without this table the
    controller runs alone on its SQLite store, the embedded default."""

    name: str = field(metadata=check(valid_name, doc="this replica's name, unique among the replicas"))
    etcd: list[str] = field(
        metadata=check(etcd_endpoints, doc="the etcd cluster's client URLs, every member (https://HOST:PORT)")
    )
    ca: Path | None = field(
        default=None,
        metadata=check(
            doc="CA of the etcd members' certificates", default_doc="tls.ca (the fleet CA signs etcd's too)"
        ),
    )
    cert: Path | None = field(
        default=None,
        metadata=check(doc="client certificate shown to etcd", default_doc="tls.cert (this controller's)"),
    )
    key: Path | None = field(
        default=None, metadata=check(doc="its private key", default_doc="tls.key (this controller's)")
    )
    prefix: str = field(
        default="/shadowplane",
        metadata=check(doc="the keys' prefix in etcd: one per Shadowplane cluster sharing an etcd"),
    )
    ttl_seconds: int = field(
        default=3,
        metadata=check(
            between(2, 60),
            doc="the leader key's lease: a dead leader is replaced after about this (plus up to a third)",
        ),
    )
    request_timeout_seconds: float = field(
        default=1.0,
        metadata=check(between(0.05, 10), doc="one etcd request; each member is tried in turn"),
    )
    shards: int = field(
        default=1,
        metadata=check(
            between(1, 256),
            doc="the services are divided into this many shards, each led by one replica (1: one leader "
            "acts for all). Capacity grows with replicas when it is a few times their number "
            "(docs/cluster.md); the same on every replica",
        ),
    )

    def validate(self) -> str | None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            return f"prefix: must start with / and not end with one (e.g. /shadowplane), got {self.prefix!r}"
        if self.request_timeout_seconds > self.ttl_seconds / 3:
            # Renewals go every third of the TTL; one that waits longer on a dead member leaves no room
            # for the next member before the leader must stop acting.
            return (
                f"request_timeout_seconds: {self.request_timeout_seconds:g} s is longer than a renewal "
                f"interval (ttl_seconds / 3 = {self.ttl_seconds / 3:.2f} s): lower it or raise ttl_seconds"
            )
        return None


@dataclass
class ControllerConfig:
    listen: str = field(default="0.0.0.0:7400", metadata=check(host_port, doc="gRPC listen HOST:PORT"))
    max_message_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=check(between(64 * 1024, 256 * 1024 * 1024), doc="largest message accepted from anyone"),
    )
    stale_after_intervals: float = field(
        default=3.0,
        metadata=check(at_least(1), doc="a host with no telemetry for this many intervals is stale"),
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    service: list[ServiceConfig] = field(default_factory=list, metadata=check(doc="[[service]] tables"))
    host: list[HostEntry] = field(
        default_factory=list,
        metadata=check(doc="[[host]] tables: the fleet. Empty = accept any agent (development only)"),
    )
    checks: dict[str, ExecCheckConfig] = field(
        default_factory=dict,
        metadata=check(doc="[checks.NAME] tables: the exec health checks the controller runs as an observer"),
    )
    cluster: ClusterConfig | None = field(
        default=None,
        metadata=check(
            doc="[cluster]: run as one of several replicas sharing an etcd cluster (docs/cluster.md)"
        ),
    )

    def validate(self) -> str | None:
        tls_problem = self.tls.validate()
        if tls_problem:
            return f"tls.{tls_problem}"
        if self.cluster is not None:
            ca = self.cluster_tls()[0]
            if any(u.startswith("https") for u in self.cluster.etcd) and ca is None:
                return "cluster.ca: https etcd endpoints need the CA of etcd's certificates (or set tls.ca)"
        problem = exec_check_names(self.checks)
        if problem:
            return problem
        names = [h.name for h in self.host]
        twice = repeated(names)
        if twice is not None:
            return f"host: {twice!r} is listed twice"
        twice = repeated(s.name for s in self.service)
        if twice is not None:
            return f"service: {twice!r} is defined twice"
        known = set(names)
        problem = self._pool_problem()
        if problem:
            return problem
        for i, svc in enumerate(self.service):
            for role, h in [("primary", svc.primary)] + [("shadows", x) for x in svc.shadows]:
                if h not in known:
                    return f"service[{i}].{role}: host {h!r} is not in the [[host]] list"
            for o in svc.observer_names():
                if o != "controller" and o not in known:
                    return f'service[{i}].observers: {o!r} is neither "controller" nor a [[host]]'
            if not self.host_entry(svc.primary).address:
                return f"service[{i}].primary: host {svc.primary!r} needs an address for health checks"
            for h in svc.shadows if svc.dns is not None else []:
                if not self.host_entry(h).address:
                    return (
                        f"service[{i}].dns: shadow {h!r} has no address for the record to point at: set its "
                        "[[host]] address"
                    )
            problem = self._cluster_quorum_problem(svc)
            if problem:
                return f"service[{i}].observers: {problem}"
            hc = svc.health
            if hc.kind == "exec" and "controller" in svc.observer_names() and hc.check not in self.checks:
                return (
                    f"service[{i}].health.check: the controller observes {svc.name!r} but has no exec check "
                    f"{hc.check!r}: add [checks.{hc.check}] with its command to this file, or leave "
                    '"controller" out of service.observers'
                )
        return None

    def _pool_problem(self) -> str | None:
        priced = [h.name for h in self.host if h.price_per_hour > 0]
        if priced:
            for i, h in enumerate(self.host):
                if h.shadow_pool and h.price_per_hour == 0:
                    return (
                        f"host[{i}].price_per_hour: {h.name!r} has no price while {priced[0]!r} has one: the "
                        "pool would reserve on it for free; give every host a price (or none, to count cores)"
                    )
        classes = {h.perf_class for h in self.host if h.shadow_pool and h.perf_class}
        for i, svc in enumerate(self.service):
            if svc.shadow_class and svc.shadow_class not in classes:
                return (
                    f"service[{i}].shadow_class: no host with shadow_pool = true has perf_class "
                    f"{svc.shadow_class!r} (have: {sorted(classes) or 'none'}): set it on a host or drop it"
                )
        return None

    def _cluster_quorum_problem(self, svc: ServiceConfig) -> str | None:
        """With replicas, no controller holds a lease seat (`ServiceConfig.lease_quorum`): the primary and
        the observer hosts must be at least three, so that losing any one host (the primary included) leaves
        a majority, whatever happens to the replicas."""
        if self.cluster is None or not svc.shadows:
            return None
        quorum = svc.lease_quorum(replicas=True)
        if len(quorum) >= 3:
            return None
        example = ["controller", *svc.shadows, "WITNESS"]
        return (
            f"with [cluster], replicas hold no seat in lease quorums, so {svc.name!r} would vote with "
            f"{quorum} only; add a host that runs an agent, e.g. observers = {example} (WITNESS: "
            "any such host)"
        )

    def lease_quorum(self, svc: ServiceConfig) -> list[str]:
        """Who votes on `svc`'s leases in this install: with [cluster], no controller seat."""
        return svc.lease_quorum(replicas=self.cluster is not None)

    def cluster_tls(self) -> tuple[Path | None, Path | None, Path | None]:
        """(ca, cert, key) for etcd: the [cluster] table's, else the controller's own."""
        c = self.cluster
        assert c is not None
        return (c.ca or self.tls.ca, c.cert or self.tls.cert, c.key or self.tls.key)

    def host_entry(self, name: str) -> HostEntry:
        return next(h for h in self.host if h.name == name)

    def service_named(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.service if s.name == name), None)


def load_controller_config(path: str | Path) -> ControllerConfig:
    return load(ControllerConfig, path)
