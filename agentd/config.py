"""The agent's TOML configuration (/etc/shadowplane/agentd.toml)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shadowplane.config import (
    absolute_path,
    at_least,
    between,
    check,
    host_port,
    load,
    positive,
    repeated,
    valid_name,
)
from shadowplane.healthcheck import ExecCheckConfig, exec_check_names
from shadowplane.prometheus import MetricsConfig
from shadowplane.tls import TlsConfig


@dataclass
class WorkloadConfig:
    name: str = field(metadata=check(valid_name, doc="workload name, unique on this host"))
    role: Literal["primary", "shadow"] = field(
        metadata=check(doc="primary: serves; shadow: stands by for it")
    )
    service: str = field(metadata=check(valid_name, doc="the service this workload belongs to"))
    cgroup: str = field(
        default="",
        metadata=check(
            lambda v: absolute_path(v) if v else None,
            doc="cgroup path, the same in every hierarchy (e.g. /shadowplane.slice/web); on hosts without "
            "systemd, or a subtree delegated to the agent. Exactly one of `cgroup` and `unit`",
        ),
    )
    unit: str = field(
        default="",
        metadata=check(
            lambda v: unit_name_problem(v) if v else None,
            doc="systemd unit that is this workload (e.g. nginx.service, web.slice): the agent finds its "
            "cgroup and sets its limits through systemd. Exactly one of `cgroup` and `unit`",
        ),
    )
    interface: str = field(
        default="", metadata=check(doc="network interface that carries the service's VIP on this host")
    )

    def validate(self) -> str | None:
        if bool(self.cgroup) == bool(self.unit):
            return (
                'unit: set exactly one of `unit` (a systemd unit, e.g. unit = "nginx.service", on hosts '
                "where systemd runs the workload) and `cgroup` (a cgroup path, e.g. cgroup = "
                f'"/shadowplane.slice/{self.name}", on hosts without systemd); '
                + ("both are set" if self.cgroup else "neither is set")
            )
        return None


@dataclass
class CaptureConfig:
    bpf: bool = field(default=True, metadata=check(doc="capture with eBPF; false = cgroup files only"))
    syscall_latency_sample_every: int = field(
        default=8,
        metadata=check(
            between(1, 1024),
            doc="inside a timing window, time 1 in N of a workload's syscalls on each CPU (counts stay "
            "exact); 1 = time all, costlier",
        ),
    )
    syscall_latency_window_seconds: float = field(
        default=1.0,
        metadata=check(
            between(0, 3600),
            doc="syscall latency is timed only inside windows this long (sys_exit is attached only then: "
            "outside them no syscall on the host pays for it); 0 = never time latency, counts only",
        ),
    )
    syscall_latency_period_seconds: float = field(
        default=10.0,
        metadata=check(
            between(0.1, 86400),
            doc="one timing window per period, at a random point of it; equal to the window = time always",
        ),
    )
    max_workloads: int = field(default=64, metadata=check(between(1, 1024), doc="BPF slots for workloads"))
    create_cgroups: bool = field(
        default=True, metadata=check(doc="create a workload's missing cgroup directories at start")
    )

    def validate(self) -> str | None:
        if self.syscall_latency_window_seconds > self.syscall_latency_period_seconds:
            return (
                f"syscall_latency_window_seconds: {self.syscall_latency_window_seconds:g} is longer than "
                f"syscall_latency_period_seconds ({self.syscall_latency_period_seconds:g}); make it at most "
                "the period (equal: time latency always)"
            )
        return None


@dataclass
class AgentConfig:
    controller: str = field(default="127.0.0.1:7400", metadata=check(host_port, doc="controller HOST:PORT"))
    controllers: list[str] = field(
        default_factory=list,
        metadata=check(
            doc="controller replicas ([cluster] in controller.toml): every one's HOST:PORT; the agent "
            "streams to each, so every replica has the history a new leader forecasts from (empty: "
            "`controller`)"
        ),
    )
    host: str = field(
        default_factory=socket.gethostname,
        metadata=check(valid_name, doc="this host's name", default_doc="the system host name"),
    )
    zone: str = field(default="", metadata=check(doc="availability zone of this host"))
    interval_seconds: float = field(
        default=10.0, metadata=check(at_least(0.1), doc="seconds between telemetry samples")
    )
    heartbeat_interval_seconds: float = field(
        default=1.0, metadata=check(positive, doc="seconds between heartbeats on the controller stream")
    )
    backlog_max_batches: int = field(
        default=720,
        metadata=check(
            positive, doc="telemetry batches kept while the controller is away; oldest dropped first"
        ),
    )
    reconnect_max_seconds: float = field(
        default=5.0, metadata=check(positive, doc="longest wait between reconnect attempts")
    )
    peer_listen: str = field(
        default="",
        metadata=check(
            lambda v: (host_port(v) or peer_address_problem(v)) if v else None,
            doc="HOST:PORT where this agent answers lease renewals from service owners (observers need "
            "it: every shadow, and by default the primary of a service with one shadow, its lease's "
            "witness); owners on other hosts dial exactly this address, so it is this host's own address",
        ),
    )
    hooks_dir: Path = field(
        default=Path("/etc/shadowplane/hooks"),
        metadata=check(doc="transition hooks: <hooks_dir>/<service>/<phase> executables"),
    )
    lease_state_file: Path = field(
        default=Path("/run/shadowplane-agentd/leases.json"),
        metadata=check(
            absolute_path,
            doc="where a stopping agent records the leases it holds, so that its next start on the same "
            "boot resumes them and keeps their VIPs (the unit keeps /run/shadowplane-agentd across "
            "restarts: RuntimeDirectoryPreserve=restart)",
        ),
    )
    cgroup_root: Path = field(
        default=Path("/sys/fs/cgroup"), metadata=check(doc="where cgroup hierarchies are mounted")
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    workload: list[WorkloadConfig] = field(default_factory=list, metadata=check(doc="[[workload]] tables"))
    checks: dict[str, ExecCheckConfig] = field(
        default_factory=dict,
        metadata=check(doc="[checks.NAME] tables: the exec health checks this host runs as an observer"),
    )

    def validate(self) -> str | None:
        tls_problem = self.tls.validate()
        if tls_problem:
            return f"tls.{tls_problem}"
        problem = exec_check_names(self.checks)
        if problem:
            return problem
        twice = repeated(w.name for w in self.workload)
        if twice is not None:
            return f"workload: name {twice!r} is used twice; workload names must be unique"
        twice = repeated(w.cgroup or w.unit for w in self.workload)
        if twice is not None:
            return f"workload: cgroup or unit {twice!r} is used by two workloads"
        if len(self.workload) > self.capture.max_workloads:
            return f"workload: {len(self.workload)} workloads exceed capture.max_workloads"
        for i, c in enumerate(self.controllers):
            problem = host_port(c)
            if problem:
                return f"controllers[{i}]: {problem}"
        twice = repeated(self.controllers)
        if twice is not None:
            return f"controllers: {twice!r} is listed twice"
        if self.peer_listen and _is_loopback(self.peer_listen) and not _is_loopback(self.controller):
            return (
                f"peer_listen: {self.peer_listen} is a loopback address, which owners on other hosts cannot "
                "reach (and on their own host it is themselves); set it to this host's address on the "
                "service network, e.g. 10.0.0.11:7401 (loopback only when the whole fleet is this one "
                "machine, controller included)"
            )
        return None


def controller_targets(cfg: AgentConfig) -> list[str]:
    """Every controller the agent streams to: the replicas, or the one controller."""
    return list(cfg.controllers) or [cfg.controller]


def _host(hostport: str) -> str:
    return hostport.rsplit(":", 1)[0].strip("[]")


def _is_loopback(hostport: str) -> bool:
    host = _host(hostport)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_address_problem(v: str) -> str | None:
    """The peer address is handed to owners as this observer's address: a wildcard would make them dial
    themselves (or whoever answers there)."""
    host = _host(v)
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = host in ("", "*")
    if wildcard:
        return (
            f"{v} listens on every address, but owners dial this address to reach this observer; set this "
            "host's own address on the service network, e.g. 10.0.0.11:7401"
        )
    return None


UNIT_SUFFIXES = (".service", ".slice", ".scope")


def unit_name_problem(v: str) -> str | None:
    """systemd's own rule for unit names (systemd.unit(5)): at most 255 characters of ASCII letters, digits,
    ':', '-', '_', '.', '\\'; here also one of the types that have a cgroup of their own."""
    if not v.endswith(UNIT_SUFFIXES):
        return f"must name a systemd service, slice or scope (e.g. nginx.service, web.slice), got {v!r}"
    stem = v.rsplit(".", 1)[0]
    if not stem or len(v) > 255 or not all(c.isascii() and (c.isalnum() or c in ":-_.\\@") for c in v):
        return f"{v!r} is not a valid systemd unit name (letters, digits, ':', '-', '_', '.', '\\', '@')"
    return None


def load_agent_config(path: str | Path) -> AgentConfig:
    return load(AgentConfig, path)
