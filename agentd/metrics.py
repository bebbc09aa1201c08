"""The agent's /metrics: running totals of what it captured, and the state of its link, capture and leases.

The agent ships deltas to the controller; for Prometheus it keeps cumulative totals (`Totals.add` per batch)
and a collector builds the metric families from them and from live state at scrape time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shadowplane.metrics import add_log2
from shadowplane.v1 import agent_pb2 as apb

if TYPE_CHECKING:
    from agentd.daemon import Agent


def _add(into: list[int], counts: list[int]) -> None:
    if len(into) < len(counts):
        into.extend([0] * (len(counts) - len(into)))
    for i, n in enumerate(counts):
        into[i] += n


@dataclass
class WorkloadTotals:
    syscalls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    syscall_latency: list[int] = field(default_factory=list)
    sample_every: int = 1
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


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        wl = list(a.totals.workloads.items())
        sys_total = CounterMetricFamily(
            "shadowplane_agent_syscalls",
            "System calls by workload and syscall",
            labels=["workload", "syscall"],
        )
        lat = HistogramMetricFamily(
            "shadowplane_agent_syscall_latency_seconds",
            "Latency of the timed system calls (1 in sample_every per thread)",
            labels=["workload"],
        )
        ratio = GaugeMetricFamily(
            "shadowplane_agent_syscall_latency_sample_ratio",
            "Share of system calls whose latency is timed",
            labels=["workload"],
        )
        bops = CounterMetricFamily(
            "shadowplane_agent_block_io_operations", "Block I/O requests completed", labels=["workload", "op"]
        )
        bbytes = CounterMetricFamily(
            "shadowplane_agent_block_io_bytes", "Block I/O bytes completed", labels=["workload", "op"]
        )
        blat = HistogramMetricFamily(
            "shadowplane_agent_block_io_latency_seconds",
            "Block I/O latency, issue to completion",
            labels=["workload"],
        )
        srtt = HistogramMetricFamily(
            "shadowplane_agent_tcp_srtt_seconds", "Smoothed RTT samples of TCP sockets", labels=["workload"]
        )
        retrans = CounterMetricFamily(
            "shadowplane_agent_tcp_retransmits", "TCP retransmitted segments", labels=["workload"]
        )
        states = CounterMetricFamily(
            "shadowplane_agent_tcp_state_changes",
            "TCP state changes by new state",
            labels=["workload", "state"],
        )
        cpu = CounterMetricFamily(
            "shadowplane_agent_cpu_seconds", "CPU time of the workload's cgroup", labels=["workload"]
        )
        mem = GaugeMetricFamily(
            "shadowplane_agent_memory_bytes", "Memory of the workload's cgroup", labels=["workload"]
        )
        cpu_lim = GaugeMetricFamily(
            "shadowplane_agent_cpu_limit_cores", "CPU limit (0: none)", labels=["workload"]
        )
        mem_lim = GaugeMetricFamily(
            "shadowplane_agent_memory_limit_bytes", "Memory limit (0: none)", labels=["workload"]
        )
        for name, w in wl:
            if w.kernel:
                for sc, n in list(w.syscalls.items()):
                    sys_total.add_metric([name, sc], n)
                add_log2(lat, [name], w.syscall_latency, 1e-9)
                ratio.add_metric([name], 1 / w.sample_every)
                for op in ("read", "write", "discard"):
                    bops.add_metric([name, op], w.block_ops[op])
                    bbytes.add_metric([name, op], w.block_bytes[op])
                add_log2(blat, [name], w.block_latency, 1e-6)
                add_log2(srtt, [name], w.tcp_srtt, 1e-6)
                retrans.add_metric([name], w.tcp_retransmits)
                for st, n in list(w.tcp_states.items()):
                    states.add_metric([name, st], n)
            cpu.add_metric([name], w.cpu_seconds)
            mem.add_metric([name], w.memory_bytes)
            cpu_lim.add_metric([name], w.cpu_limit_cores)
            mem_lim.add_metric([name], w.memory_limit_bytes)
        yield from (
            sys_total,
            lat,
            ratio,
            bops,
            bbytes,
            blat,
            srtt,
            retrans,
            states,
            cpu,
            mem,
            cpu_lim,
            mem_lim,
        )

        dropped = CounterMetricFamily(
            "shadowplane_agent_dropped_events", "Events the capture could not account", labels=["reason"]
        )
        for reason, n in (a.bpf.dropped_events() if a.bpf else {}).items():
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily(
            "shadowplane_agent_bpf_active", "1 if eBPF capture runs", value=int(a.bpf is not None)
        )
        yield GaugeMetricFamily(
            "shadowplane_agent_controller_connected",
            "1 while the controller stream is up",
            value=int(a.link.state.connected),
        )
        yield GaugeMetricFamily(
            "shadowplane_agent_telemetry_backlog_batches",
            "Batches not yet acknowledged",
            value=len(a.link.backlog),
        )
        yield CounterMetricFamily(
            "shadowplane_agent_telemetry_batches_dropped",
            "Batches dropped from a full backlog",
            value=a.link.backlog.dropped_total,
        )
        held = GaugeMetricFamily(
            "shadowplane_agent_lease_held", "1 while this host owns the service", labels=["service"]
        )
        token = GaugeMetricFamily("shadowplane_agent_lease_token", "Fencing token held", labels=["service"])
        holders = a.commands.holders if a.commands else {}
        # Every service this host serves or stands by for has a series (0 when not held), so a panel of
        # lease_held by instance shows who holds it and who does not.
        for service in sorted({w.service for w in a.cfg.workload} | set(holders)):
            h = holders.get(service)
            held.add_metric([service], int(h is not None and not h.lost))
            if h is not None:
                token.add_metric([service], h.token)
        yield held
        yield token
