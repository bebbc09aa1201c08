"""Assembles the controller: store, registry, the HA loop, and the gRPC services (agent stream, fleet,
lease renewals, health, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from controller.cluster.journal import JournaledStore
from controller.cluster.replica import Replica
from controller.config import ControllerConfig
from controller.event_log import EventLog
from controller.failover.decide import Decision, Request
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.failover.records import LocalRecords, ServiceRecords
from controller.fleet_api import FleetService
from controller.fleet_api import add_to_server as add_fleet_to_server
from controller.ingest import AgentStreamService
from controller.pool.zones import ZoneHealth
from controller.prometheus_collector import ControllerCollector, EventCounters
from controller.registry import AgentRegistry
from controller.scaling.decision import ScalingDecision
from controller.scaling.loop import ScalingLoop
from controller.status import AgentView, ControllerStatus, ScalingView, ServiceView
from controller.store import SqliteStore, Store
from controller.store.worker import StoreWorker
from shadowplane import prometheus
from shadowplane.clock import now_ms
from shadowplane.lease_observer import LeaseServicer
from shadowplane.loop_lag import LoopLag
from shadowplane.tls import add_port, warn_plaintext
from shadowplane.undecodable import RefuseUndecodable
from shadowplane.v1 import agent_pb2, agent_pb2_grpc, fleet_pb2, lease_pb2, lease_pb2_grpc

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 300.0
# History is compacted on this step when no forecaster runs: the packaged model's.
DEFAULT_STEP_MS = 300_000
# Python hands the GIL to a waiting thread only after this long (default 5 ms). The loop waits for it at
# every wake-up while the store worker or a forecast thread computes; a renewal takes several wake-ups, so
# the default alone could cost 20 ms. 1 ms keeps the loop's share prompt at a small cost to the workers.
GIL_SWITCH_INTERVAL_SECONDS = 0.001


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
    worker: StoreWorker  # large reads and pruning, off the event loop
    loop_lag: LoopLag
    replica: Replica | None = None  # one of several sharing etcd ([cluster]); None: alone on SQLite

    # ---- the read model, and what the Fleet API may ask (fleet_api.Operations) ----

    def status(self) -> ControllerStatus:
        """The whole view, for /metrics."""
        now = now_ms()
        return ControllerStatus(
            now,
            self.agents(),
            self.services(),
            self.scaling_view(now),
            self.registry.rejections.views(),
            self.replica.view() if self.replica is not None else None,
            self.failover.zones,
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

    def zones(self) -> tuple[ZoneHealth, ...]:
        return self.failover.zones

    def pool_demand(self, q: float) -> dict[str, tuple[float, int]] | None:
        return self.scaling.demand_peaks(q) if self.scaling is not None else None

    def cluster_state(self) -> str:
        return f"{self.replica.name}: {self.replica.view().state}" if self.replica is not None else ""

    async def stop(self, grace: float = 1.0) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.replica is not None:
            await self.replica.stop()  # resigns: the next leader need not wait out the TTL
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.to_thread(self.worker.close)  # waits for a running prune or query
        self.store.close()


async def start(cfg: ControllerConfig, store: Store | None = None) -> Controller:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    replica: Replica | None = None
    if cfg.cluster is not None:
        journaled = JournaledStore(cfg.store.path)
        store, replica = journaled, Replica(cfg, journaled)
    store = store or SqliteStore(cfg.store.path)
    worker = StoreWorker(store)
    registry = AgentRegistry()
    events = EventLog(store)
    if replica is not None:
        replica.journal.store.on_imported_event = events.deliver
    not_leading = replica.not_leading if replica is not None else (lambda service: "")
    # Each service's ownership, one copy that the HA loop, the orchestrator and the scaling loop all read:
    # etcd's records with replicas, else the store's
    book: ServiceRecords = replica.records if replica is not None else LocalRecords(store)
    observer = controller_lease_observer(cfg, store)
    scaling = (
        ScalingLoop(
            cfg,
            store,
            registry,
            events,
            worker=worker,
            not_leading=not_leading,
            records=book.get,
        )
        if cfg.scaling.enabled
        else None
    )
    orchestrator = Orchestrator(
        cfg,
        store,
        registry,
        events,
        observer,
        on_takeover=scaling.before_takeover if scaling else None,
        on_released=scaling.after_release if scaling else None,
        records=book,
        not_leading=not_leading,
    )
    failover = FailoverLoop(
        cfg,
        store,
        registry,
        events,
        observer,
        orchestrator,
        tracks=replica.tracks if replica is not None else (lambda service: True),
        hears=replica.hears if replica is not None else (lambda service: True),
    )
    if scaling is not None:
        # a cold tier's shadows are pre-warmed while their primary's zone is degraded, at once
        scaling.degraded_hosts = lambda: failover.degraded
        failover.on_zones_changed = scaling.wake.set
    if replica is not None:
        rep = replica
        rep.in_flight = lambda shard: any(
            rt.busy for rt in failover.services.values() if rep.shard_of(rt.cfg.name) == shard
        )
    server = grpc.aio.server(
        interceptors=[RefuseUndecodable()],
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    c = Controller(
        cfg,
        store,
        registry,
        events,
        failover,
        scaling,
        server,
        0,
        health_servicer,
        [],
        worker,
        LoopLag(),
        replica,
    )
    agent_pb2_grpc.add_AgentStreamServicer_to_server(
        AgentStreamService(
            cfg, store, registry, failover, on_telemetry=scaling.on_telemetry if scaling else None
        ),
        server,
    )
    add_fleet_to_server(FleetService(cfg, store, events, c, worker), server)
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
    prom.register(c.loop_lag.collector("shadowplane_controller_loop_lag_seconds", "controller"))
    prometheus.serve(cfg.metrics, prom)
    if replica is not None:
        replica.start()
        log.info("replica %s of a cluster on etcd %s", replica.name, ", ".join(replica.dcs.endpoints))
    c.tasks.append(asyncio.create_task(c.loop_lag.probe()))
    c.tasks.append(asyncio.create_task(failover.run()))
    if scaling is not None:
        c.tasks.append(asyncio.create_task(scaling.run()))
    c.tasks.append(asyncio.create_task(prune_forever(c)))
    return c


async def prune_forever(c: Controller) -> None:
    """The store's history upkeep: samples older than raw_hours folded into forecast steps, everything older
    than retention_hours deleted. Both can take seconds: on the store worker, never on the loop."""
    cfg = c.cfg.store
    while True:
        now = time.time()
        # On the forecaster's grid, so that a step of history is one row; without scaling, the packaged
        # model's step (history kept for a forecaster turned on later).
        step_ms = c.scaling.history.step_ms if c.scaling is not None else DEFAULT_STEP_MS
        for what, job in (
            (
                "compacting",
                functools.partial(
                    _compact, older_than_ms=int((now - cfg.raw_hours * 3600) * 1000), step_ms=step_ms
                ),
            ),
            (
                "retention",
                functools.partial(_prune, older_than_ms=int((now - cfg.retention_hours * 3600) * 1000)),
            ),
        ):
            try:
                n = await c.worker.run(job)
            except Exception:  # a failed round (disk, lock) is retried at the next one, the loop goes on
                log.exception("%s: failed", what)
                n = 0
            if n and what == "compacting":
                log.info(
                    "compacting: %d samples older than %g h folded into %g s steps",
                    n,
                    cfg.raw_hours,
                    step_ms / 1000,
                )
            elif n:
                log.info("retention: deleted %d rows of history older than %g h", n, cfg.retention_hours)
        await asyncio.sleep(PRUNE_EVERY_SECONDS)


def _compact(store: Store, older_than_ms: int, step_ms: int) -> int:
    return store.compact(older_than_ms, step_ms)


def _prune(store: Store, older_than_ms: int) -> int:
    return store.prune(older_than_ms)
