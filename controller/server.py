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
from controller.events import EventLog
from controller.failover.loop import FailoverLoop
from controller.failover.observer import ControllerObserver, LeaseService
from controller.failover.orchestrator import Orchestrator
from controller.fleet_api import FleetService
from controller.ingest import AgentStreamService
from controller.metrics import ControllerCollector, EventCounters
from controller.registry import AgentRegistry
from controller.scaling.loop import ScalingLoop
from controller.store import SqliteStore, Store
from shadowplane import metrics
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
    observer = ControllerObserver(store, [s.name for s in cfg.service], cfg.failover.lease_seconds)
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
    agent_pb2_grpc.add_AgentStreamServicer_to_server(
        AgentStreamService(cfg, store, registry, failover), server
    )
    fleet_pb2_grpc.add_FleetServicer_to_server(
        FleetService(cfg, store, registry, events, failover, scaling), server
    )
    lease_pb2_grpc.add_LeaseServicer_to_server(LeaseService(observer), server)
    health_servicer = health.aio.HealthServicer()
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
    port = add_port(server, cfg.listen, cfg.tls)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    await server.start()
    for name in services[:3]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "controller listening on %s (port %d), store %s, %d services",
        cfg.listen,
        port,
        cfg.store.path,
        len(cfg.service),
    )
    c = Controller(cfg, store, registry, events, failover, scaling, server, port, health_servicer, [])
    counters = EventCounters()
    events.listeners.append(counters)
    prom = CollectorRegistry()
    prom.register(ControllerCollector(c, counters))
    metrics.serve(cfg.metrics, prom)
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
