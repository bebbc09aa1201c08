"""The agent's /metrics: running totals of what it captured, and the state of its link, capture and leases,
rendered from the agent's status view (agentd/status.py) at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agentd.status import AgentStatus
from shadowplane.prometheus import add_log2


class AgentCollector(Collector):
    def __init__(self, status: Callable[[], AgentStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        wl = list(st.totals.items())
        buckets = st.capture.histogram_buckets
        sys_total = CounterMetricFamily(
            "shadowplane_agent_syscalls",
            "System calls by workload and syscall",
            labels=["workload", "syscall"],
        )
        lat = HistogramMetricFamily(
            "shadowplane_agent_syscall_latency_seconds",
            "Latency of the timed system calls: inside timing windows, 1 in sample_every of the workload's "
            "calls on each CPU, those that start and end in the same window",
            labels=["workload"],
        )
        ratio = GaugeMetricFamily(
            "shadowplane_agent_syscall_latency_sample_ratio",
            "Share of system calls whose latency is timed while a timing window is open",
            labels=["workload"],
        )
        timed = CounterMetricFamily(
            "shadowplane_agent_syscall_latency_timed_seconds",
            "Time during which syscall latency was timed (timing windows open): the latency histogram's "
            "observation time",
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
        reapplied = CounterMetricFamily(
            "shadowplane_agent_limits_reapplied",
            "Times the agent found the workload's limits reset (e.g. by systemctl daemon-reload) and wrote "
            "them again",
            labels=["workload"],
        )
        held = GaugeMetricFamily(
            "shadowplane_agent_limits_held",
            "1 if the kernel holds the limits the controller set (or none were set); 0: the sample's "
            "limits_problem says why not",
            labels=["workload"],
        )
        for name, w in wl:
            if w.kernel and buckets:
                for sc, n in list(w.syscalls.items()):
                    sys_total.add_metric([name, sc], n)
                add_log2(lat, [name], w.syscall_latency, 1e-9, buckets["syscall_latency"])
                ratio.add_metric([name], 1 / w.sample_every)
                timed.add_metric([name], w.latency_timed_seconds)
                for op in ("read", "write", "discard"):
                    bops.add_metric([name, op], w.block_ops[op])
                    bbytes.add_metric([name, op], w.block_bytes[op])
                add_log2(blat, [name], w.block_latency, 1e-6, buckets["block_io_latency"])
                add_log2(srtt, [name], w.tcp_srtt, 1e-6, buckets["tcp_srtt"])
                retrans.add_metric([name], w.tcp_retransmits)
                for state, n in list(w.tcp_states.items()):
                    states.add_metric([name, state], n)
            cpu.add_metric([name], w.cpu_seconds)
            mem.add_metric([name], w.memory_bytes)
            cpu_lim.add_metric([name], w.cpu_limit_cores)
            mem_lim.add_metric([name], w.memory_limit_bytes)
            reapplied.add_metric([name], w.limits_reapplied)
            held.add_metric([name], int(w.limits_held))
        yield from (
            sys_total,
            lat,
            ratio,
            timed,
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
            reapplied,
            held,
        )

        dropped = CounterMetricFamily(
            "shadowplane_agent_dropped_events", "Events the capture could not account", labels=["reason"]
        )
        for reason, n in st.capture.dropped_events.items():
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily(
            "shadowplane_agent_bpf_active", "1 if eBPF capture runs", value=int(st.capture.bpf_active)
        )
        feature = GaugeMetricFamily(
            "shadowplane_agent_capture_feature",
            "1 if this kernel lets the BPF capture see the feature, 0 if not (the agent's log and "
            "CaptureStatus.features say why)",
            labels=["feature"],
        )
        for f in st.capture.features:
            feature.add_metric([f.name], int(f.captured))
        yield feature
        yield GaugeMetricFamily(
            "shadowplane_agent_controller_connected",
            "1 while the controller stream is up",
            value=int(st.link.connected),
        )
        yield GaugeMetricFamily(
            "shadowplane_agent_telemetry_backlog_batches",
            "Batches not yet acknowledged",
            value=st.link.backlog_batches,
        )
        yield CounterMetricFamily(
            "shadowplane_agent_telemetry_batches_dropped",
            "Batches dropped from a full backlog",
            value=st.link.batches_dropped,
        )
        rejected = CounterMetricFamily(
            "shadowplane_agent_messages_rejected",
            "Messages the controller refused, by kind and reason (rejected telemetry batches are dropped)",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(st.link.rejected.items()):
            rejected.add_metric([kind, reason], n)
        yield rejected
        held = GaugeMetricFamily(
            "shadowplane_agent_lease_held", "1 while this host owns the service", labels=["service"]
        )
        token = GaugeMetricFamily("shadowplane_agent_lease_token", "Fencing token held", labels=["service"])
        # Every service this host serves or stands by for has a series (0 when not held), so a panel of
        # lease_held by instance shows who holds it and who does not.
        for lease in st.leases:
            held.add_metric([lease.service], int(lease.held))
            if lease.token is not None:
                token.add_metric([lease.service], lease.token)
        yield held
        yield token
