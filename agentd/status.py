"""The agent's read model: what it captured so far, and the state of its capture, link and leases.

`Agent.status()` makes one `AgentStatus`, plain frozen data, that /metrics (agentd/prometheus_collector.py)
and the systemd status line render; neither needs the daemon's objects. The running totals are the one
part that accumulates: the agent ships deltas to the controller, Prometheus wants counters, so `Totals.add`
sums every batch it sends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from agentd.capture.kernel_features import FeatureStatus
from shadowplane.v1 import agent_pb2 as apb


def _add(into: list[int], counts: list[int]) -> None:
    if len(into) < len(counts):
        into.extend([0] * (len(counts) - len(into)))
    for i, n in enumerate(counts):
        into[i] += n


@dataclass
class WorkloadTotals:
    """Everything captured for one workload since the agent started (latest values for gauges)."""

    syscalls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    syscall_latency: list[int] = field(default_factory=list)
    sample_every: int = 1
    latency_timed_seconds: float = 0.0  # of the histogram above: how long latency was timed
    block_ops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    block_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    block_latency: list[int] = field(default_factory=list)
    tcp_srtt: list[int] = field(default_factory=list)
    tcp_retransmits: int = 0
    tcp_states: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cpu_seconds: float = 0.0
    memory_bytes: int = 0
    cpu_limit_cores: float = 0.0
    memory_limit_bytes: int = 0
    limits_reapplied: int = 0  # cumulative: the agent found its limits reset and wrote them again
    limits_held: bool = True  # the kernel holds the limits the controller set (or none were set)
    kernel: bool = False  # any sample had BPF profiles: without them, zeros would read as "no syscalls"


class Totals:
    def __init__(self) -> None:
        self.workloads: dict[str, WorkloadTotals] = defaultdict(WorkloadTotals)

    def add(self, batch: apb.TelemetryBatch) -> None:
        for s in batch.samples:
            w = self.workloads[s.workload]
            w.kernel = w.kernel or s.HasField("syscalls")
            for name, n in s.syscalls.by_name.items():
                w.syscalls[name] += n
            _add(w.syscall_latency, list(s.syscalls.latency.counts))
            w.sample_every = s.syscalls.latency_sample_every or 1
            w.latency_timed_seconds += s.syscalls.latency_timed_seconds
            b = s.block_io
            for op, ops, nbytes in (
                ("read", b.read_ops, b.read_bytes),
                ("write", b.write_ops, b.write_bytes),
                ("discard", b.discard_ops, b.discard_bytes),
            ):
                w.block_ops[op] += ops
                w.block_bytes[op] += nbytes
            _add(w.block_latency, list(b.latency.counts))
            _add(w.tcp_srtt, list(s.tcp.srtt.counts))
            w.tcp_retransmits += s.tcp.retransmits
            for state, n in s.tcp.state_changes.items():
                w.tcp_states[state] += n
            r = s.resources
            w.cpu_seconds += r.cpu_seconds
            w.memory_bytes, w.cpu_limit_cores, w.memory_limit_bytes = (
                r.memory_bytes,
                r.cpu_limit_cores,
                r.memory_limit_bytes,
            )
            w.limits_reapplied, w.limits_held = r.limits_reapplied, not r.limits_problem


@dataclass(frozen=True)
class CaptureView:
    bpf_active: bool
    unavailable_reason: str  # why not, with the fix ("" while active)
    dropped_events: Mapping[str, int]  # cumulative, by reason (the program's names)
    histogram_buckets: Mapping[str, int]  # log2 buckets of each kernel histogram ({} without BPF)
    features: tuple[FeatureStatus, ...] = ()  # what this kernel lets the program capture (() without BPF)

    def bpf_summary(self) -> str:
        """ "on", "on (not captured on this kernel: a, b)" or "off"."""
        if not self.bpf_active:
            return "off"
        missing = [f.name for f in self.features if not f.captured]
        return f"on (not captured on this kernel: {', '.join(missing)})" if missing else "on"


@dataclass(frozen=True)
class LinkView:
    controller: str
    connected: bool
    last_error: str
    backlog_batches: int  # not yet acknowledged
    batches_dropped: int  # dropped from a full backlog since start
    rejected: Mapping[tuple[str, str], int] = field(default_factory=dict)  # by the controller: (kind, reason)
    last_rejected: str = ""  # the latest rejection: what, the field and the reason


@dataclass(frozen=True)
class LeaseView:
    service: str
    held: bool  # this host holds the service's address under a live lease
    token: int | None  # the token of this host's newest lease of it (None: never held since start)


@dataclass(frozen=True)
class AgentStatus:
    host: str
    workloads: int
    capture: CaptureView
    link: LinkView
    leases: tuple[LeaseView, ...]  # every service this host serves or stands by for, and any it holds
    totals: Mapping[str, WorkloadTotals]  # by workload: live accumulators, read-only here

    def line(self) -> str:
        """One line for systemd's STATUS= (and `systemctl status`)."""
        link = "connected" if self.link.connected else "disconnected"
        if not self.link.connected and self.link.last_error:
            link += f" ({self.link.last_error[:160]})"  # e.g. a missing certificate: say it where admins look
        rejected = sum(self.link.rejected.values())
        return (
            f"{self.workloads} workloads, controller {self.link.controller} {link}, "
            f"BPF {self.capture.bpf_summary()}, backlog {self.link.backlog_batches} batches"
            + (f", {rejected} messages rejected (last: {self.link.last_rejected[:160]})" if rejected else "")
        )
