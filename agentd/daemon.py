"""The agent daemon: sample every interval, stream to the controller, apply what it asks."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import psutil
from prometheus_client import CollectorRegistry

from agentd import held_leases
from agentd.actuate.address import Vip
from agentd.actuate.limits import CgroupfsWriter, LimitsWriter, WorkloadLimits
from agentd.capture.bpf_capture import BpfCapture, BpfLoadError, Builder, unavailable_reason
from agentd.capture.collector import ROLES, Collector
from agentd.capture.kernel_features import FeatureStatus
from agentd.cgroupfs import CgroupLayout
from agentd.commands import CommandHandler
from agentd.config import AgentConfig, controller_targets
from agentd.failover import ObserverRole
from agentd.latency_windows import WindowPlan, run_windows
from agentd.link import CHANNEL_OPTIONS, Backlog, ControllerLink, ControllerLinks
from agentd.prometheus_collector import AgentCollector
from agentd.status import AgentStatus, CaptureView, LeaseView, LinkView, Totals
from agentd.systemd_units import DBusUnits, SystemdError, SystemdWriter, Units, prepare
from shadowplane import __version__, prometheus, sdnotify
from shadowplane.lease_observer import LeaseServicer
from shadowplane.loop_lag import LoopLag
from shadowplane.tls import add_port, aio_channel, warn_plaintext
from shadowplane.undecodable import RefuseUndecodable
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import lease_pb2_grpc as lgrpc
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)


def start_capture(cfg: AgentConfig, builder: Builder | None = None) -> tuple[BpfCapture | None, str]:
    """The BPF capture, or None and the reason (said once, with the fix) why the agent runs without it.
    `builder`: a build child started earlier (with the start-up privileges), else one is started now."""
    if not cfg.capture.bpf:
        if builder is not None:
            builder.close()
        return None, "disabled by configuration (capture.bpf = false)"
    reason = unavailable_reason()
    if reason is None:
        try:
            bpf = BpfCapture(
                cfg.capture.max_workloads, cfg.capture.syscall_latency_sample_every, builder=builder
            )
        except BpfLoadError as e:
            reason = str(e)
        else:
            log_features(bpf.features)
            return bpf, ""
    elif builder is not None:
        builder.close()
    log.warning("BPF capture unavailable, continuing with cgroup files only: %s", reason)
    return None, reason


def resolve_units(cfg: AgentConfig, units: Units) -> AgentConfig:
    """`cfg` with each unit workload's cgroup filled in from systemd. A unit systemd cannot place is logged
    with the fix and given the cgroup a service gets by default; its limits then fail, saying why, until the
    agent is restarted with the unit in place."""
    out = []
    for w in cfg.workload:
        if w.unit:
            try:
                cgroup = prepare(units, w)
            except SystemdError as e:
                cgroup = f"/system.slice/{w.unit}"
                log.error("workload %s: %s (reading %s meanwhile)", w.name, e, cgroup)
            log.info("workload %s: systemd unit %s, cgroup %s", w.name, w.unit, cgroup)
            w = replace(w, cgroup=cgroup)
        out.append(w)
    return replace(cfg, workload=out)


def workload_limits(cfg: AgentConfig, layout: CgroupLayout, units: Units | None) -> dict[str, WorkloadLimits]:
    """Each workload's limits keeper: through systemd for a unit, cgroup files for a cgroup path."""
    out = {}
    for w in cfg.workload:
        writer: LimitsWriter = (
            SystemdWriter(units, w.unit) if w.unit and units is not None else CgroupfsWriter(layout, w.cgroup)
        )
        out[w.name] = WorkloadLimits(w.name, layout, w.cgroup, writer)
    return out


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
    def __init__(
        self,
        cfg: AgentConfig,
        config_file: str = "/etc/shadowplane/agentd.toml",
        units: Units | None = None,
    ) -> None:
        self.layout = CgroupLayout.detect(cfg.cgroup_root)
        # systemd's D-Bus API only where a workload names a unit: hosts without systemd never touch the bus
        self.units = (
            units if units is not None else (DBusUnits() if any(w.unit for w in cfg.workload) else None)
        )
        if self.units is not None:
            cfg = resolve_units(cfg, self.units)
        self.cfg = cfg
        if cfg.capture.create_cgroups:
            for w in cfg.workload:
                if w.unit:
                    continue  # systemd's tree: it makes a unit's cgroup when the unit starts
                for d in self.layout.ensure(w.cgroup):
                    log.info("workload %s: created cgroup directory %s", w.name, d)
        self.limits = workload_limits(cfg, self.layout, self.units)
        # The capture is loaded by `start`, after the leases held before a restart are resumed: building
        # it takes seconds to tens of seconds, longer than a lease.
        self.bpf: BpfCapture | None = None
        self.bpf_reason = "not loaded yet"
        self.collector = Collector(self.layout, cfg.workload, None)
        self.instance_id = uuid.uuid4().hex
        self.seq = 0
        self.totals = Totals()
        self.link = ControllerLinks(
            [
                ControllerLink(
                    target,
                    self.hello,
                    Backlog(cfg.backlog_max_batches),
                    heartbeat_seconds=cfg.heartbeat_interval_seconds,
                    reconnect_max_seconds=cfg.reconnect_max_seconds,
                    channel_factory=lambda t: aio_channel(t, cfg.tls, "controller", CHANNEL_OPTIONS),
                )
                for target in controller_targets(cfg)
            ]
        )
        if cfg.tls.plaintext:
            warn_plaintext("the agent")
        # config_file: where an operator adds a [checks.NAME] a service's exec check names
        self.observer = ObserverRole(cfg.host, self.link.send, cfg.checks, config_file)
        self.link.greeting = self.observer.views
        self.commands: CommandHandler | None = None
        self.peer_server: grpc.aio.Server | None = None
        # Sampling reads BPF maps and a dozen cgroup files per workload: milliseconds to seconds on a busy
        # host. It runs in this one thread (so samples never overlap), never on the loop that runs the
        # lease timers and self-fencing.
        self.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.loop_lag = LoopLag()
        self.latency_windows: asyncio.Task[None] | None = None

    def status(self) -> AgentStatus:
        """The read model: what /metrics and systemd's status line render."""
        holders = self.commands.holders if self.commands else {}
        services = sorted({w.service for w in self.cfg.workload} | set(holders))
        return AgentStatus(
            host=self.cfg.host,
            workloads=len(self.cfg.workload),
            capture=self._capture(),
            link=LinkView(
                controller=self.link.target,
                connected=self.link.connected,
                last_error=self.link.last_error,
                backlog_batches=self.link.backlog_batches,
                batches_dropped=self.link.dropped_total,
                rejected=dict(self.link.rejected),
                last_rejected=self.link.last_rejected,
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
            telemetry_batches_dropped=self.link.dropped_total,
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
        """Read the kernel and cgroup files into batch `seq`; touches nothing the loop reads. Limits that
        something reset are written again first, so the sample says what the kernel holds after that."""
        for limits in self.limits.values():
            try:
                limits.check()
            except Exception:  # one workload's limits must not cost every workload its sample
                log.exception("workload %s: checking its limits failed", limits.name)
        samples = self.collector.collect()
        for s in samples:
            kept = self.limits.get(s.workload)
            if kept is not None:
                s.resources.limits_problem = kept.problem
                s.resources.limits_reapplied = kept.reapplied
        return apb.TelemetryBatch(seq=seq, samples=samples, capture=self.capture_status())

    async def sample_off_loop(self) -> apb.TelemetryBatch:
        """The next batch: read in the sampler thread; the agent's own state changes on the loop."""
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(self.sampler, self.collect, self.seq + 1)
        self.seq = batch.seq
        self.totals.add(batch)
        return batch

    async def start(self, builder: Builder | None = None) -> None:
        """Resume the leases held before a restart, serve the peer port, then load the capture (slow)."""
        await self.start_failover_roles()
        self.bpf, self.bpf_reason = await asyncio.to_thread(start_capture, self.cfg, builder)
        self.collector = Collector(self.layout, self.cfg.workload, self.bpf)
        if self.bpf is not None:
            cap = self.cfg.capture
            plan = WindowPlan(cap.syscall_latency_window_seconds, cap.syscall_latency_period_seconds)
            log.info("BPF capture: %s", plan.describe())
            self.latency_windows = asyncio.create_task(run_windows(plan, self.bpf.time_latency))

    async def start_failover_roles(self) -> None:
        """Resume what the last run of this agent held when it stopped (agentd/held_leases.py) if its
        observers still grant it; every other address an earlier run left behind is removed, then serve."""
        self.commands = CommandHandler(self.cfg, self.layout, self.observer, self.link.send, self.limits)
        self.link.on_command = self.commands
        await self.resume_held_leases(self.commands)
        self._remove_stale_addresses(self.commands)
        if self.cfg.peer_listen:
            self.peer_server = grpc.aio.server(interceptors=[RefuseUndecodable()])
            lgrpc.add_LeaseServicer_to_server(LeaseServicer(self.observer.leases), self.peer_server)
            if add_port(self.peer_server, self.cfg.peer_listen, self.cfg.tls) == 0:
                raise OSError(f"peer_listen: cannot listen on {self.cfg.peer_listen}")
            await self.peer_server.start()

    async def resume_held_leases(self, commands: CommandHandler) -> None:
        path = self.cfg.lease_state_file
        try:
            records = held_leases.take(path)
        except held_leases.StateFileError as e:
            log.warning("lease_state_file %s: unreadable, nothing resumed (%s)", path, e)
            return
        boot, now = held_leases.boot_id(), time.monotonic()
        resumable = []
        for held in records:
            problem = held_leases.resume_problem(held, self.cfg.host, boot, now)
            if problem is None:
                resumable.append(held)
            else:
                log.warning("service %s: lease %d not resumed: %s", held.service, held.token, problem)
        results = await asyncio.gather(*(commands.resume(h) for h in resumable), return_exceptions=True)
        for held, result in zip(resumable, results, strict=True):
            if isinstance(result, BaseException):
                log.error("service %s: resuming lease %d failed: %s", held.service, held.token, result)

    def _remove_stale_addresses(self, commands: CommandHandler) -> None:
        """No address survives an agent that is not running but those it resumed: drop the rest."""
        kept = {h.vip.address for h in commands.holders.values() if h.vip is not None and not h.lost}
        for address in commands.addresses.remove_marked(keep=kept):
            log.warning("removed %s left by an earlier run: this agent does not hold its lease", address)

    async def stop(self) -> None:
        """Stop renewing but keep the addresses (each to its kernel lifetime), and record the leases for
        the next start (agentd/held_leases.py): a restart within the lease moves no VIP."""
        if self.commands is None:
            return
        held = self.commands.suspend(held_leases.boot_id())
        if not held:
            return
        try:
            held_leases.save(self.cfg.lease_state_file, held)
        except OSError as e:
            # Nothing recorded, so nothing can be resumed: let the addresses go now, as before.
            log.error(
                "lease_state_file %s: cannot record the held leases (%s); removing their addresses",
                self.cfg.lease_state_file,
                e,
            )
            for h in held:
                if h.vip:
                    await asyncio.to_thread(
                        self.commands.addresses.remove, Vip.parse(h.vip, h.interface or "eth0")
                    )
            return
        for h in held:
            log.info(
                "service %s: stopped renewing lease %d%s; recorded for the next start",
                h.service,
                h.token,
                f", {h.vip} left to its kernel lifetime" if h.vip else "",
            )

    async def run(self) -> None:
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
        await self.stop()
        if self.commands is not None:
            await self.commands.close()
        await self.observer.close()
        if self.peer_server is not None:
            await self.peer_server.stop(0.2)
        if self.latency_windows is not None:
            self.latency_windows.cancel()
        await asyncio.to_thread(self.sampler.shutdown)  # a sample still reading must finish before ...
        if self.bpf is not None:
            self.bpf.close()  # ... its map descriptors close
        if isinstance(self.units, DBusUnits):
            self.units.close()


async def serve(
    cfg: AgentConfig, config_file: str = "/etc/shadowplane/agentd.toml", builder: Builder | None = None
) -> None:
    agent = Agent(cfg, config_file)
    try:
        await agent.start(builder)
    except BaseException:
        await agent.close()
        raise
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
        ", ".join(controller_targets(cfg)),
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
