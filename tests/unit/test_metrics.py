"""Both daemons' /metrics: collectors render the daemons' status views (the controller's made by its real
parts), with prometheus_client as a scrape would, checked for the important series and by `promtool check
metrics`."""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agentd.capture.kernel_features import FeatureStatus
from agentd.prometheus_collector import AgentCollector
from agentd.status import AgentStatus, CaptureView, LeaseView, LinkView, Totals
from controller.config import ControllerConfig, HostEntry, ServiceConfig
from controller.event_log import EventLog
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.prometheus_collector import ControllerCollector, EventCounters
from controller.registry import AgentRegistry, AgentSession
from controller.scaling.decision import AppliedLimits, Readiness
from controller.scaling.loop import ScalingLoop
from controller.scaling.planner import Target
from controller.status import ControllerStatus
from controller.store import EventRecord, ServiceRecord, SqliteStore
from controller.stream_validation import Problem
from lab.procs import free_port
from shadowplane.clock import now_ms
from shadowplane.prometheus import MetricsConfig, add_log2, log2_buckets, serve
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb
from tests.support import need

GIB = 2**30


class One(Collector):
    def __init__(self, fam: HistogramMetricFamily) -> None:
        self.fam = fam

    def collect(self) -> Iterator[Metric]:
        yield self.fam


def render(collector: Collector) -> str:
    reg = CollectorRegistry()
    reg.register(collector)
    return generate_latest(reg).decode()


def value(text: str, series: str) -> float:
    """The value of one exact series line (name{labels in exposition order})."""
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no series {series} in:\n{text}"
    return float(m.group(1))


def promtool_check(text: str) -> None:
    need(
        shutil.which("promtool"),
        "promtool is missing",
        "apt-get install prometheus (make setup does: scripts/apt-packages.txt)",
    )
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


# ---- log2 histograms ----


def test_log2_buckets_become_a_cumulative_histogram_in_seconds() -> None:
    fam = HistogramMetricFamily("x_latency_seconds", "test", labels=["w"])
    add_log2(fam, ["web"], [2, 0, 3], 1e-6, 32)  # 2 in [0,2) us, 3 in [4,8) us
    text = render(One(fam))
    assert 'x_latency_seconds_bucket{le="2e-06",w="web"} 2.0' in text
    assert 'x_latency_seconds_bucket{le="4e-06",w="web"} 2.0' in text
    assert 'x_latency_seconds_bucket{le="8e-06",w="web"} 5.0' in text
    assert 'x_latency_seconds_bucket{le="+Inf",w="web"} 5.0' in text
    assert 'x_latency_seconds_count{w="web"} 5.0' in text
    # midpoints: 2 x 0.5 us + 3 x 6 us
    assert value(text, 'x_latency_seconds_sum{w="web"}') == pytest.approx(19e-6)


def test_log2_buckets_are_the_same_on_every_scrape_and_the_clamped_bucket_is_unbounded() -> None:
    empty, _ = log2_buckets([], 1e-9, 32)
    busy, _ = log2_buckets([1] * 32, 1e-9, 32)
    assert [le for le, _ in empty] == [le for le, _ in busy]  # telemetry trims trailing zeros; we must not
    assert len(busy) == 32 and busy[-1] == ("+Inf", 32.0)
    # bucket 31 holds everything the kernel clamped (>= 2^31 ns): it has no finite upper bound
    assert busy[-2] == (repr(2**31 * 1e-9), 31.0)


# ---- the agent ----


def sample(workload: str, cpu_seconds: float, kernel: bool = True) -> tpb.WorkloadSample:
    s = tpb.WorkloadSample(workload=workload, cgroup=f"/{workload}", start_unix_ms=0, end_unix_ms=1000)
    s.resources.cpu_seconds = cpu_seconds
    s.resources.memory_bytes = 300 * 2**20
    s.resources.cpu_limit_cores = 1.5
    s.resources.memory_limit_bytes = GIB
    if kernel:
        s.syscalls.by_name["read"] = 100
        s.syscalls.latency.counts.extend([0, 0, 0, 4])  # timed calls in [8, 16) ns
        s.syscalls.latency_sample_every = 8
        s.syscalls.latency_timed_seconds = 0.1
        s.block_io.write_ops, s.block_io.write_bytes = 2, 8192
        s.block_io.latency.counts.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])  # [1024, 2048) us
        s.tcp.state_changes["ESTABLISHED"] = 1
        s.tcp.retransmits = 1
    return s


BUCKETS = {"syscall_latency": 32, "block_io_latency": 32, "tcp_srtt": 32}


def agent_status(totals: Totals, *, bpf: bool, holding: bool) -> AgentStatus:
    """An agent's status view as `Agent.status()` makes it (a real agent needs cgroups and the BPF loader)."""
    return AgentStatus(
        host="h1",
        workloads=2,
        capture=CaptureView(
            bpf_active=bpf,
            unavailable_reason="" if bpf else "disabled by configuration (capture.bpf = false)",
            dropped_events={"task_storage_full": 5} if bpf else {},
            histogram_buckets=BUCKETS if bpf else {},
            features=(
                FeatureStatus("syscalls", True, "every system call counted by number"),
                FeatureStatus(
                    "tcp_srtt", False, "TCP smoothed round-trip times (no tracepoint tcp:tcp_probe)"
                ),
            )
            if bpf
            else (),
        ),
        link=LinkView(
            "127.0.0.1:7400",
            connected=True,
            last_error="",
            backlog_batches=0,
            batches_dropped=3,
            rejected={("telemetry", "not_finite"): 2},
            last_rejected="telemetry batch 9: samples[0].resources.cpu_seconds: nan is not a finite number",
        ),
        leases=(
            LeaseView("db", held=False, token=None),
            LeaseView("web", held=holding, token=7 if holding else None),
        ),
        totals=totals.workloads,
    )


def test_agent_metrics_are_running_totals_of_the_shipped_deltas() -> None:
    totals = Totals()
    totals.add(apb.TelemetryBatch(seq=1, samples=[sample("web", 0.25)]))
    totals.add(apb.TelemetryBatch(seq=2, samples=[sample("web", 0.5)]))
    text = render(AgentCollector(lambda: agent_status(totals, bpf=True, holding=True)))

    assert value(text, 'shadowplane_agent_cpu_seconds_total{workload="web"}') == 0.75
    assert value(text, 'shadowplane_agent_syscalls_total{syscall="read",workload="web"}') == 200
    assert value(text, 'shadowplane_agent_syscall_latency_sample_ratio{workload="web"}') == 1 / 8
    # the histogram's observation time: the timing windows of both samples
    assert value(text, 'shadowplane_agent_syscall_latency_timed_seconds_total{workload="web"}') == 0.2
    lat = "shadowplane_agent_syscall_latency_seconds_bucket"
    assert value(text, f'{lat}{{le="8e-09",workload="web"}}') == 0
    assert value(text, f'{lat}{{le="1.6e-08",workload="web"}}') == 8
    assert value(text, f'{lat}{{le="+Inf",workload="web"}}') == 8
    blat = "shadowplane_agent_block_io_latency_seconds_bucket"
    assert value(text, f'{blat}{{le="0.001024",workload="web"}}') == 0
    assert value(text, f'{blat}{{le="0.002048",workload="web"}}') == 4
    assert value(text, 'shadowplane_agent_block_io_bytes_total{op="write",workload="web"}') == 16384
    assert value(text, 'shadowplane_agent_tcp_state_changes_total{state="ESTABLISHED",workload="web"}') == 2
    assert value(text, 'shadowplane_agent_tcp_retransmits_total{workload="web"}') == 2
    assert value(text, 'shadowplane_agent_memory_limit_bytes{workload="web"}') == GIB
    assert value(text, 'shadowplane_agent_limits_held{workload="web"}') == 1
    held_not = sample("web", 0.1)
    held_not.resources.limits_reapplied, held_not.resources.limits_problem = 2, "cpu.max: ..."
    totals.add(apb.TelemetryBatch(seq=3, samples=[held_not]))
    text = render(AgentCollector(lambda: agent_status(totals, bpf=True, holding=True)))
    assert value(text, 'shadowplane_agent_limits_reapplied_total{workload="web"}') == 2  # the agent's count
    assert value(text, 'shadowplane_agent_limits_held{workload="web"}') == 0
    assert value(text, 'shadowplane_agent_dropped_events_total{reason="task_storage_full"}') == 5
    assert value(text, "shadowplane_agent_bpf_active") == 1
    # what this kernel lets the capture see: a missing feature is 0, not absent
    assert value(text, 'shadowplane_agent_capture_feature{feature="syscalls"}') == 1
    assert value(text, 'shadowplane_agent_capture_feature{feature="tcp_srtt"}') == 0
    assert value(text, "shadowplane_agent_controller_connected") == 1
    assert value(text, "shadowplane_agent_telemetry_batches_dropped_total") == 3
    assert value(text, 'shadowplane_agent_messages_rejected_total{kind="telemetry",reason="not_finite"}') == 2
    assert value(text, 'shadowplane_agent_lease_held{service="web"}') == 1
    assert value(text, 'shadowplane_agent_lease_token{service="web"}') == 7
    assert value(text, 'shadowplane_agent_lease_held{service="db"}') == 0  # configured, not held
    promtool_check(text)


def test_agent_without_bpf_exports_no_kernel_zeros() -> None:
    totals = Totals()
    totals.add(apb.TelemetryBatch(seq=1, samples=[sample("web", 0.25, kernel=False)]))
    text = render(AgentCollector(lambda: agent_status(totals, bpf=False, holding=False)))
    assert value(text, 'shadowplane_agent_cpu_seconds_total{workload="web"}') == 0.25
    assert value(text, "shadowplane_agent_bpf_active") == 0
    assert "shadowplane_agent_syscall_latency_seconds_bucket{" not in text  # absent, not "no syscalls"
    assert "shadowplane_agent_block_io_bytes_total{" not in text
    assert "shadowplane_agent_lease_token{" not in text
    assert "shadowplane_agent_capture_feature{" not in text
    promtool_check(text)


def test_status_line_names_what_this_kernel_does_not_capture() -> None:
    line = agent_status(Totals(), bpf=True, holding=False).line()
    assert "BPF on (not captured on this kernel: tcp_srtt)" in line
    assert ", BPF off, " in agent_status(Totals(), bpf=False, holding=False).line()


# ---- the controller ----


def test_transition_events_are_counted_with_their_durations() -> None:
    k = EventCounters()
    k(EventRecord("failover-complete", "web", "s1", "p1 -> s1 in 310 ms", 1, {"took_ms": "310"}))
    k(EventRecord("failback-complete", "web", "p1", "s1 -> p1 in 40 ms", 2, {"took_ms": "40"}))
    k(EventRecord("health", "web", "p1", "down", 3))
    assert k.transitions == {("web", "failover"): 1, ("web", "failback"): 1}
    # buckets 0.1, 0.25, 0.5 ...: 0.04 s falls in all three, 0.31 s from 0.5 on
    assert k.durations["web"][:3] == [1, 1, 2] and k.durations["web"][-1] == 2
    assert k.by_kind["health"] == 1


class Parts:
    """The controller's real parts, as server.start assembles them (without the gRPC server)."""

    def __init__(self, tmp_path: Path) -> None:
        self.cfg = ControllerConfig(
            host=[HostEntry("p1", address="127.0.0.1"), HostEntry("s1", address="127.0.0.1")],
            service=[ServiceConfig("web", "p1", ["s1"], vip="10.0.0.100/24")],
        )
        self.store = SqliteStore(tmp_path / "c.db")
        self.registry = AgentRegistry()
        self.events = EventLog(self.store)
        self.counters = EventCounters()
        self.events.listeners.append(self.counters)
        observer = controller_lease_observer(self.cfg, self.store)
        self.scaling = ScalingLoop(self.cfg, self.store, self.registry, self.events)
        orchestrator = Orchestrator(self.cfg, self.store, self.registry, self.events, observer)
        self.failover = FailoverLoop(self.cfg, self.store, self.registry, self.events, observer, orchestrator)

    def status(self) -> ControllerStatus:
        now = now_ms()
        return ControllerStatus(
            now,
            self.registry.views(),
            self.failover.service_views(),
            self.scaling.status(now),
            self.registry.rejections.views(),
        )

    def render(self) -> str:
        return render(ControllerCollector(self.status, self.counters))


def hello(host: str, role: tpb.Role.ValueType) -> apb.Hello:
    return apb.Hello(
        host=host,
        instance_id=f"{host}-1",
        workloads=[tpb.WorkloadInfo(name="web", cgroup="/web", role=role, service="web")],
        interval_ms=1000,
    )


def test_controller_metrics_show_owner_transitions_forecast_demand_and_shadows(tmp_path: Path) -> None:
    c = Parts(tmp_path)
    now = now_ms()
    # p1 serves and has sent a sample: 0.5 CPU seconds over 1 s, 512 MiB
    c.store.register_agent(hello("p1", tpb.ROLE_PRIMARY), "peer", now)
    s = tpb.WorkloadSample(workload="web", cgroup="/web", start_unix_ms=now - 1000, end_unix_ms=now)
    s.resources.cpu_seconds, s.resources.memory_bytes = 0.5, 512 * 2**20
    c.store.append_batch("p1", "p1-1", apb.TelemetryBatch(seq=1, samples=[s]), now)
    # s1 is connected and sees p1 down
    c.registry.attach(AgentSession("s1", "s1-1", "peer", hello("s1", tpb.ROLE_SHADOW), now, now))
    c.failover.on_observation("s1", apb.Observation(service="web", target="p1", up=False, kind="health"))
    # a failover to s1 happened, as the orchestrator records it
    c.store.save_service_state(ServiceRecord("web", owner="s1", token=4, phase="stable"))
    c.failover.events.record("failover", "web", "s1", "p1 down")
    c.failover.events.record("failover-complete", "web", "s1", "p1 -> s1 in 420 ms", took_ms=420)
    # the scaling loop's latest forecast and what s1's agent applied
    c.scaling.demand["web"] = "p1/web"
    c.scaling.targets["web"] = {
        "cpu": Target(0.8, {"q0.5": 0.5, "q0.9": 0.7, "q0.99": 0.9}, "model"),
        "memory": Target(GIB, {"q0.5": 600e6, "q0.99": 900e6}, "model"),
    }
    c.scaling.applied[("s1", "web")] = AppliedLimits(cpu_cores=1.2, memory_bytes=2 * GIB)
    c.scaling.readiness[("s1", "web")] = Readiness(True, "limits in place")
    # s1's stream sent a batch with a NaN, refused twice
    for _ in range(2):
        c.registry.rejections.add("s1", "telemetry", Problem("samples[0].x", "not_finite", "nan"), now)

    text = c.render()
    assert value(text, 'shadowplane_service_owner_info{owner="s1",service="web"}') == 1
    assert value(text, 'shadowplane_service_fencing_token{service="web"}') == 4
    assert value(text, 'shadowplane_service_transitions_total{kind="failover",service="web"}') == 1
    dur = "shadowplane_service_transition_duration_seconds"
    assert value(text, f'{dur}_bucket{{le="0.25",service="web"}}') == 0
    assert value(text, f'{dur}_bucket{{le="0.5",service="web"}}') == 1
    assert value(text, f'{dur}_sum{{service="web"}}') == pytest.approx(0.42)
    assert value(text, 'shadowplane_events_total{kind="failover-complete"}') == 1
    assert value(text, 'shadowplane_service_observer_up{observer="s1",service="web",target="p1"}') == 0
    assert value(text, "shadowplane_controller_agents_connected") == 1
    assert value(text, 'shadowplane_controller_agent_last_seen_seconds{host="s1"}') < 60
    rejected = (
        'shadowplane_controller_agent_messages_rejected_total{host="s1",kind="telemetry",reason="not_finite"}'
    )
    assert value(text, rejected) == 2
    assert value(text, 'shadowplane_demand_cpu_cores{service="web"}') == pytest.approx(0.5)
    assert value(text, 'shadowplane_demand_memory_bytes{service="web"}') == 512 * 2**20
    assert value(text, 'shadowplane_forecast_cpu_cores{q="0.99",service="web"}') == 0.9
    assert value(text, 'shadowplane_forecast_target_cpu_cores{service="web"}') == 0.8
    assert value(text, 'shadowplane_forecast_memory_bytes{q="0.5",service="web"}') == 600e6
    assert value(text, 'shadowplane_forecast_target_memory_bytes{service="web"}') == GIB
    assert value(text, 'shadowplane_shadow_cpu_limit_cores{host="s1",service="web"}') == 1.2
    assert value(text, 'shadowplane_shadow_memory_limit_bytes{host="s1",service="web"}') == 2 * GIB
    assert value(text, 'shadowplane_shadow_ready{host="s1",service="web"}') == 1
    assert re.search(
        r'^shadowplane_forecast_model_info\{source="(model|fallback)",version=".+"\} 1\.0$', text, re.M
    )
    promtool_check(text)


def test_demand_of_a_silent_primary_is_absent_not_stale(tmp_path: Path) -> None:
    c = Parts(tmp_path)
    then = now_ms() - 3_600_000  # its last sample is an hour old
    c.store.register_agent(hello("p1", tpb.ROLE_PRIMARY), "peer", then)
    s = tpb.WorkloadSample(workload="web", cgroup="/web", start_unix_ms=then - 1000, end_unix_ms=then)
    s.resources.cpu_seconds = 0.5
    c.store.append_batch("p1", "p1-1", apb.TelemetryBatch(seq=1, samples=[s]), then)
    c.scaling.demand["web"] = "p1/web"
    text = c.render()
    assert "shadowplane_demand_cpu_cores{" not in text
    assert value(text, 'shadowplane_service_owner_info{owner="none",service="web"}') == 1
    promtool_check(text)


# ---- the endpoint ----


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


def test_endpoint_serves_metrics_from_the_event_loop() -> None:
    class Loopy(Collector):
        """Records which thread collects: the daemon's state belongs to the event loop's."""

        def collect(self) -> Iterator[Metric]:
            asyncio.get_running_loop()  # raises outside the loop's thread
            yield HistogramMetricFamily("x_seconds", "test", buckets=[("+Inf", 1.0)], sum_value=0.5)

    reg = CollectorRegistry()
    reg.register(Loopy())
    port = free_port()

    async def main() -> None:
        serve(MetricsConfig(f"127.0.0.1:{port}"), reg)
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("text/plain")
        assert b"x_seconds_count 1.0" in body
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
        assert headers["content-encoding"] == "gzip" and b"x_seconds_count" in gzip.decompress(body)
        status, _, body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status.endswith("200 OK") and body == b""
        assert (await http(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0].endswith("404 Not Found")
        assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].endswith("405 Method Not Allowed")
        # a port already taken fails the daemon's start, naming the key
        with pytest.raises(OSError, match=r"metrics\.listen: cannot listen on"):
            serve(MetricsConfig(f"127.0.0.1:{port}"), reg)

    asyncio.run(main())
    with socket.socket() as s:  # the loop's end closed the listening socket (REUSEADDR: the closed
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections linger in TIME_WAIT)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_endpoint_off_when_not_configured() -> None:
    async def main() -> None:
        serve(MetricsConfig(), CollectorRegistry())

    asyncio.run(main())
