"""The Fleet service: what `shadowctl` and fleet tooling read and ask."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controller.config import ControllerConfig
from controller.registry import AgentRegistry
from controller.store import AgentRecord, Store
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc

DEFAULT_LIMIT = 60
MAX_LIMIT = 10_000


def host_health(rec: AgentRecord, connected: bool, now_ms: int, stale_after_intervals: float) -> int:
    if not connected:
        return int(fpb.HOST_HEALTH_DOWN)
    interval = rec.hello.interval_ms or 10_000
    if now_ms - max(rec.last_telemetry_ms, rec.first_seen_ms) > stale_after_intervals * interval:
        return int(fpb.HOST_HEALTH_STALE)
    return int(fpb.HOST_HEALTH_HEALTHY)


class FleetService(fgrpc.FleetServicer):
    def __init__(self, cfg: ControllerConfig, store: Store, registry: AgentRegistry) -> None:
        self.cfg, self.store, self.registry = cfg, store, registry

    async def ListHosts(
        self, request: fpb.ListHostsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListHostsResponse:
        now = int(time.time() * 1000)
        live = self.registry.connected()
        out = []
        for rec in self.store.agents():
            session = live.get(rec.host)
            connected = session is not None and session.instance_id == rec.instance_id
            status = _status(rec, connected, now, self.cfg.stale_after_intervals)
            if connected and session is not None:
                status.last_seen_unix_ms = max(status.last_seen_unix_ms, session.last_heard_ms)
                status.capture.CopyFrom(session.capture)
            out.append(status)
        return fpb.ListHostsResponse(hosts=out)

    async def GetTelemetry(
        self, request: fpb.GetTelemetryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.GetTelemetryResponse:
        if not request.host:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "host is required (see ListHosts for names)"
            )
        limit = request.limit or DEFAULT_LIMIT
        if limit > MAX_LIMIT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit {limit} is above {MAX_LIMIT}")
        rows = self.store.samples(
            request.host, request.workload, request.cgroup, request.since_unix_ms, limit
        )
        return fpb.GetTelemetryResponse(samples=[fpb.StoredSample(host=h, sample=s) for h, s in rows])

    async def _not_wired(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "failover orchestration is not wired in yet")

    async def ListServices(  # noqa: N802
        self, request: fpb.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListServicesResponse:
        await self._not_wired(context)
        return fpb.ListServicesResponse()

    async def Failover(  # noqa: N802
        self, request: fpb.FailoverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.TransitionReply:
        await self._not_wired(context)
        return fpb.TransitionReply()

    async def Failback(  # noqa: N802
        self, request: fpb.FailbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.TransitionReply:
        await self._not_wired(context)
        return fpb.TransitionReply()

    async def ListEvents(  # noqa: N802
        self, request: fpb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListEventsResponse:
        await self._not_wired(context)
        return fpb.ListEventsResponse()

    async def WatchEvents(  # noqa: N802
        self, request: fpb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fpb.Event]:
        await self._not_wired(context)
        yield fpb.Event()


def _status(rec: AgentRecord, connected: bool, now: int, stale_after: float) -> fpb.HostStatus:
    return fpb.HostStatus(
        host=rec.host,
        health=host_health(rec, connected, now, stale_after),  # type: ignore[arg-type]
        connected=connected,
        last_seen_unix_ms=rec.last_seen_ms,
        agent_version=rec.hello.agent_version,
        peer=rec.peer,
        capture=rec.hello.capture,
        workloads=rec.hello.workloads,
        host_info=rec.hello.host_info,
        interval_ms=rec.hello.interval_ms,
    )
