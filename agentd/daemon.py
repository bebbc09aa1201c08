"""The agent daemon: sample every interval, stream to the controller, apply what it asks."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
from prometheus_client import CollectorRegistry

from agentd.actuate.address import Addresses
from agentd.capture.bpf_capture import BpfCapture, BpfLoadError, unavailable_reason
from agentd.capture.collector import ROLES, Collector
from agentd.capture.kernel_features import FeatureStatus
from agentd.cgroupfs import CgroupLayout
from agentd.commands import CommandHandler
from agentd.config import AgentConfig
from agentd.failover import ObserverRole
from agentd.link import CHANNEL_OPTIONS, Backlog, ControllerLink
from agentd.prometheus_collector import AgentCollector
from agentd.status import AgentStatus, CaptureView, LeaseView, LinkView, Totals
from shadowplane import __version__, prometheus, sdnotify
from shadowplane.lease_observer import LeaseServicer
from shadowplane.loop_lag import LoopLag
from shadowplane.tls import add_port, aio_channel, warn_plaintext
from shadowplane.undecodable import RefuseUndecodable
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import lease_pb2_grpc as lgrpc
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)


def start_capture(cfg: AgentConfig) -> tuple[BpfCapture | None, str]:
    """The BPF capture, or None and the reason (said once, with the fix) why the agent runs without it."""
    if not cfg.capture.bpf:
        return None, "disabled by configuration (capture.bpf = false)"
    reason = unavailable_reason()
    if reason is None:
        try:
            bpf = BpfCapture(cfg.capture.max_workloads, cfg.capture.syscall_latency_sample_every)
        except BpfLoadError as e:
            reason = str(e)
        else:
            log_features(bpf.features)
            return bpf, ""
    log.warning("BPF capture unavailable, continuing with cgroup files only: %s", reason)
    return None, reason


def log_features(features: tuple[FeatureStatus, ...]) -> None:
    """Say once, at start, what this kernel lets the capture see and what it does not (and why)."""
    have = [f.name for f in features if f.captured]
    log.info("BPF capture loaded: %s", ", ".join(have))
    for f in features:
        if not f.captured:
            log.warning("BPF capture: %s not captured on this kernel: %s", f.name, f.detail)


def capture_features(features: tuple[FeatureStatus, ...]) -> list[tpb.CaptureFeature]:
    return [tpb.CaptureFeature(name=f.name, captured=f.captured, detail=f.detail) for f in features]


class Agent:
    def __init__(self, cfg: AgentConfig, config_file: str = "/etc/shadowplane/agentd.toml") -> None:
        self.cfg = cfg
        self.layout = CgroupLayout.detect(cfg.cgroup_root)
        if cfg.capture.create_cgroups:
            for w in cfg.workload:
                for d in self.layout.ensure(w.cgroup):
                    log.info("workload %s: created cgroup directory %s", w.name, d)
        self.bpf, self.bpf_reason = start_capture(cfg)
        self.collector = Collector(self.layout, cfg.workload, self.bpf)
        self.instance_id = uuid.uuid4().hex
        self.seq = 0
        self.totals = Totals()
        self.link = ControllerLink(
            cfg.controller,
            self.hello,
            Backlog(cfg.backlog_max_batches),
            heartbeat_seconds=cfg.heartbeat_interval_seconds,
            reconnect_max_seconds=cfg.reconnect_max_seconds,
            channel_factory=lambda target: aio_channel(target, cfg.tls, "controller", CHANNEL_OPTIONS),
        )
        if cfg.tls.plaintext:
            warn_plaintext("the agent")
        # config_file: where an operator adds a [checks.NAME] a service's exec check names
        self.observer = ObserverRole(cfg.host, self.link.send, cfg.checks, config_file)
        self.commands: CommandHandler | None = None
        self.peer_server: grpc.aio.Server | None = None
        # Sampling reads BPF maps and a dozen cgroup files per workload: milliseconds to seconds on a busy
        # host. It runs in this one thread (so samples never overlap), never on the loop that runs the
        # lease timers and self-fencing.
        self.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.loop_lag = LoopLag()

    def status(self) -> AgentStatus:
        """The read model: what /metrics and systemd's status line render."""
        holders = self.commands.holders if self.commands else {}
        services = sorted({w.service for w in self.cfg.workload} | set(holders))
        return AgentStatus(
            host=self.cfg.host,
            workloads=len(self.cfg.workload),
            capture=self._capture(),
            link=LinkView(
                controller=self.cfg.controller,
                connected=self.link.state.connected,
                last_error=self.link.state.last_error,
                backlog_batches=len(self.link.backlog),
                batches_dropped=self.link.backlog.dropped_total,
                rejected=dict(self.link.state.rejected),
                last_rejected=self.link.state.last_rejected,
            ),
            leases=tuple(
                LeaseView(
                    s,
                    held=s in holders and not holders[s].lost,
                    token=holders[s].token if s in holders else None,
                )
                for s in services
            ),
            totals=self.totals.workloads,
        )

    def _capture(self) -> CaptureView:
        return CaptureView(
            bpf_active=self.bpf is not None,
            unavailable_reason=self.bpf_reason,
            dropped_events=self.bpf.dropped_events() if self.bpf else {},
            histogram_buckets=self.bpf.histogram_buckets() if self.bpf else {},
            features=self.bpf.features if self.bpf else (),
        )

    def capture_status(self) -> tpb.CaptureStatus:
        """What the controller hears of this agent's capture (with every hello and batch)."""
        c = self._capture()
        return tpb.CaptureStatus(
            bpf_active=c.bpf_active,
            bpf_unavailable_reason=c.unavailable_reason,
            dropped_events=dict(c.dropped_events),
            telemetry_batches_dropped=self.link.backlog.dropped_total,
            features=capture_features(c.features),
        )

    def hello(self) -> apb.Hello:
        return apb.Hello(
            host=self.cfg.host,
            agent_version=__version__,
            instance_id=self.instance_id,
            workloads=[
                tpb.WorkloadInfo(name=w.name, cgroup=w.cgroup, role=ROLES[w.role], service=w.service)
                for w in self.cfg.workload
            ],
            capture=self.capture_status(),
            host_info=apb.HostInfo(
                cpu_cores=os.cpu_count() or 1,
                memory_bytes=psutil.virtual_memory().total,
                zone=self.cfg.zone,
                kernel=platform.release(),
            ),
            interval_ms=int(self.cfg.interval_seconds * 1000),
            peer_address=self.cfg.peer_listen,
        )

    def collect(self, seq: int) -> apb.TelemetryBatch:
        """Read the kernel and cgroup files into batch `seq`; touches nothing the loop reads."""
        return apb.TelemetryBatch(seq=seq, samples=self.collector.collect(), capture=self.capture_status())

    async def sample_off_loop(self) -> apb.TelemetryBatch:
        """The next batch: read in the sampler thread; the agent's own state changes on the loop."""
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(self.sampler, self.collect, self.seq + 1)
        self.seq = batch.seq
        self.totals.add(batch)
        return batch

    async def start_failover_roles(self) -> None:
        """No address survives an agent that is not running: drop any we left behind, then serve."""
        stale = Addresses()
        try:
            for address in stale.remove_all_marked():
                log.warning("removed %s left by an earlier run: this agent holds no lease yet", address)
        finally:
            stale.close()
        self.commands = CommandHandler(self.cfg, self.layout, self.observer, self.link.send)
        self.link.on_command = self.commands
        if self.cfg.peer_listen:
            self.peer_server = grpc.aio.server(interceptors=[RefuseUndecodable()])
            lgrpc.add_LeaseServicer_to_server(LeaseServicer(self.observer.leases), self.peer_server)
            if add_port(self.peer_server, self.cfg.peer_listen, self.cfg.tls) == 0:
                raise OSError(f"peer_listen: cannot listen on {self.cfg.peer_listen}")
            await self.peer_server.start()

    async def run(self) -> None:
        await self.start_failover_roles()
        link_task = asyncio.create_task(self.link.run())
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.cfg.interval_seconds
        try:
            while True:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                next_at += self.cfg.interval_seconds
                try:
                    self.link.submit(await self.sample_off_loop())
                except Exception:  # one bad sample must not stop the agent
                    log.exception("sampling failed")
        finally:
            link_task.cancel()

    async def close(self) -> None:
        if self.commands is not None:
            await self.commands.close()
        await self.observer.close()
        if self.peer_server is not None:
            await self.peer_server.stop(0.2)
        await asyncio.to_thread(self.sampler.shutdown)  # a sample still reading must finish before ...
        if self.bpf is not None:
            self.bpf.close()  # ... its map descriptors close


async def serve(cfg: AgentConfig, config_file: str = "/etc/shadowplane/agentd.toml") -> None:
    agent = Agent(cfg, config_file)
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent.status))
    registry.register(agent.loop_lag.collector("shadowplane_agent_loop_lag_seconds", "agent"))
    prometheus.serve(cfg.metrics, registry)
    lag_probe = asyncio.create_task(agent.loop_lag.probe())
    log.info(
        "agent %s started: %d workloads, interval %.1fs, controller %s, BPF %s",
        cfg.host,
        len(cfg.workload),
        cfg.interval_seconds,
        cfg.controller,
        agent.status().capture.bpf_summary(),
    )
    task = asyncio.create_task(agent.run())

    try:
        await sdnotify.serve_until_stopped(lambda: agent.status().line(), task)
        log.info("agent %s stopping", cfg.host)
    except Exception as e:
        log.error("agent %s failed: %s", cfg.host, e)
        raise
    finally:
        task.cancel()
        lag_probe.cancel()
        await agent.close()
