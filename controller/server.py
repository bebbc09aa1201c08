"""Assembles the controller: store, registry, the HA loop, and the gRPC services (agent stream, fleet,
lease renewals, health, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from controller.config import ControllerConfig
from controller.event_log import EventLog
from controller.failover.decide import Decision, Request
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.fleet_api import FleetService
from controller.ingest import AgentStreamService
from controller.prometheus_collector import ControllerCollector, EventCounters
from controller.registry import AgentRegistry
from controller.scaling.decision import ScalingDecision
from controller.scaling.loop import ScalingLoop
from controller.status import AgentView, ControllerStatus, ScalingView, ServiceView
from controller.store import SqliteStore, Store
from shadowplane import prometheus
from shadowplane.clock import now_ms
from shadowplane.lease_observer import LeaseServicer
from shadowplane.tls import add_port, warn_plaintext
from shadowplane.v1 import agent_pb2, agent_pb2_grpc, fleet_pb2, fleet_pb2_grpc, lease_pb2, lease_pb2_grpc

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 300.0


@dataclass
class Controller:
    cfg: ControllerConfig
    store: Store
    registry: AgentRegistry
    events: EventLog
    failover: FailoverLoop
    scaling: ScalingLoop | None
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    tasks: list[asyncio.Task[None]]

    # ---- the read model, and what the Fleet API may ask (fleet_api.Operations) ----

    def status(self) -> ControllerStatus:
        """The whole view, for /metrics."""
        now = now_ms()
        return ControllerStatus(
            now, self.agents(), self.services(), self.scaling_view(now), self.registry.rejections.views()
        )

    def agents(self) -> tuple[AgentView, ...]:
        return self.registry.views()

    def services(self) -> tuple[ServiceView, ...]:
        return self.failover.service_views()

    def scaling_view(self, now_ms: int) -> ScalingView | None:
        return self.scaling.status(now_ms) if self.scaling is not None else None

    def request(self, service: str, req: Request) -> Decision:
        return self.failover.request(service, req)

    def plan(self, now_ms: int) -> list[ScalingDecision] | None:
        return self.scaling.plan(now_ms) if self.scaling is not None else None

    def override_changed(self) -> None:
        if self.scaling is not None:
            self.scaling.wake.set()

    async def stop(self, grace: float = 1.0) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.store.close()


async def start(cfg: ControllerConfig, store: Store | None = None) -> Controller:
    store = store or SqliteStore(cfg.store.path)
    registry = AgentRegistry()
    events = EventLog(store)
    observer = controller_lease_observer(cfg, store)
    scaling = ScalingLoop(cfg, store, registry, events) if cfg.scaling.enabled else None
    orchestrator = Orchestrator(
        cfg,
        store,
        registry,
        events,
        observer,
        on_takeover=scaling.before_takeover if scaling else None,
        on_released=scaling.after_release if scaling else None,
    )
    failover = FailoverLoop(cfg, store, registry, events, observer, orchestrator)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
    )
    health_servicer = health.aio.HealthServicer()
    c = Controller(cfg, store, registry, events, failover, scaling, server, 0, health_servicer, [])
    agent_pb2_grpc.add_AgentStreamServicer_to_server(
        AgentStreamService(cfg, store, registry, failover), server
    )
    fleet_pb2_grpc.add_FleetServicer_to_server(FleetService(cfg, store, events, c), server)
    lease_pb2_grpc.add_LeaseServicer_to_server(LeaseServicer(observer), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [
        agent_pb2.DESCRIPTOR.services_by_name["AgentStream"].full_name,
        fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].full_name,
        lease_pb2.DESCRIPTOR.services_by_name["Lease"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(services, server)
    if cfg.tls.plaintext:
        warn_plaintext("the controller")
    c.port = add_port(server, cfg.listen, cfg.tls)
    if c.port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    await server.start()
    for name in services[:3]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "controller listening on %s (port %d), store %s, %d services, incarnation %s",
        cfg.listen,
        c.port,
        cfg.store.path,
        len(cfg.service),
        registry.incarnation,
    )
    counters = EventCounters()
    events.listeners.append(counters)
    prom = CollectorRegistry()
    prom.register(ControllerCollector(c.status, counters))
    prometheus.serve(cfg.metrics, prom)
    c.tasks.append(asyncio.create_task(failover.run()))
    if scaling is not None:
        c.tasks.append(asyncio.create_task(scaling.run()))
    c.tasks.append(asyncio.create_task(prune_forever(c)))
    return c


async def prune_forever(c: Controller) -> None:
    while True:
        cutoff = int((time.time() - c.cfg.store.retention_hours * 3600) * 1000)
        n = c.store.prune(cutoff)
        if n:
            log.info("retention: deleted %d samples older than %.0f h", n, c.cfg.store.retention_hours)
        await asyncio.sleep(PRUNE_EVERY_SECONDS)
