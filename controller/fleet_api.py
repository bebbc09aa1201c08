"""The Fleet service: what `shadowctl` and fleet tooling read and ask.

It renders the parts of the controller's read model it answers with (`Operations.agents()`, `services()`,
`scaling_view()`: each call builds only what it renders) and the store, and asks for changes through the
narrow `Operations`; messages are made, and every request checked before anything reads it, in
fleet_messages.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from controller.config import ControllerConfig
from controller.event_log import EventLog
from controller.failover.decide import Decision, Request
from controller.fleet_messages import (
    MAX_LIMIT,
    capture_message,
    decision_message,
    event_message,
    host_status,
    override_from_message,
    pool_plan_message,
    request_problem,
    service_message,
    shadow_message,
    telemetry_response_bytes,
    zones_message,
)
from controller.pool.placement import PlanOptions
from controller.pool.report import PoolInputs, PoolReport, pool_inputs, report_in_child
from controller.pool.zones import ZoneHealth, degraded_hosts
from controller.scaling.decision import ScalingDecision
from controller.status import AgentView, ScalingView, ServiceView
from controller.store import Store
from controller.store.worker import StoreWorker
from shadowplane.clock import now_ms
from shadowplane.tls import peer_identity
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import telemetry_pb2 as tpb

DEFAULT_LIMIT = 60
# A workload's role as its agent announced it, in the words an override's refusal uses.
ROLE_NAMES = {tpb.ROLE_PRIMARY: "primary", tpb.ROLE_SHADOW: "shadow"}


class Operations(Protocol):
    """What the Fleet API may ask of the controller beyond reading: narrow, so it needs no object graph."""

    def agents(self) -> tuple[AgentView, ...]:
        """The read model's connected agents and their capture."""
        ...

    def services(self) -> tuple[ServiceView, ...]:
        """The read model's services: owner, token, phase, observers' views."""
        ...

    def scaling_view(self, now_ms: int) -> ScalingView | None:
        """The read model's forecasts, demand and shadows (None: scaling is disabled)."""
        ...

    def request(self, service: str, req: Request) -> Decision:
        """An operator's failover or failback, decided now and carried out in the background."""
        ...

    def plan(self, now_ms: int) -> list[ScalingDecision] | None:
        """The scaling decisions the next cycle would make (None: scaling is disabled)."""
        ...

    def cluster_state(self) -> str:
        """Replicas: this one's name and standing ("" for a single controller)."""
        ...

    def override_changed(self) -> None:
        """An override was stored: apply it now rather than at the next cycle."""
        ...

    def zones(self) -> tuple[ZoneHealth, ...]:
        """Zone health as the HA loop last judged it (empty: no host has a zone, or still in the placement
        grace after a start)."""
        ...

    def pool_demand(self, q: float) -> dict[str, tuple[float, int]] | None:
        """Each forecast service's demand at quantile `q`, at its peak: (cores, bytes). None: scaling is
        disabled, so nothing is forecast."""
        ...


class FleetService(fgrpc.FleetServicer):
    def __init__(
        self,
        cfg: ControllerConfig,
        store: Store,
        events: EventLog,
        ops: Operations,
        worker: StoreWorker | None = None,
    ) -> None:
        self.cfg, self.store, self.events, self.ops = cfg, store, events, ops
        # Reads of up to MAX_LIMIT rows run in the store worker, never on the loop that answers renewals.
        self.worker = worker or StoreWorker(store)
        self._pool_lock = asyncio.Lock()  # one pool plan at a time: each is a process and seconds
        self._pool_last: tuple[tuple[PoolInputs, PlanOptions], PoolReport] | None = None

    async def ListHosts(
        self, request: fpb.ListHostsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListHostsResponse:
        await valid(request, context)
        now = now_ms()
        live = {a.host: a for a in self.ops.agents()}
        out = []
        for rec in self.store.agents():
            agent = live.get(rec.host)
            connected = agent is not None and agent.instance_id == rec.instance_id
            status = host_status(rec, connected, now, self.cfg.stale_after_intervals)
            if connected and agent is not None:
                status.last_seen_unix_ms = max(status.last_seen_unix_ms, agent.last_heard_ms)
                status.capture.CopyFrom(capture_message(agent.capture))
            out.append(status)
        return fpb.ListHostsResponse(hosts=out)

    async def GetTelemetry(  # type: ignore[override]
        self, request: fpb.GetTelemetryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """The reply leaves as the bytes the store worker wrote (see `add_to_server`)."""
        await valid(request, context)
        limit = request.limit or DEFAULT_LIMIT

        def read(store: Store) -> bytes:
            return telemetry_response_bytes(
                store.sample_blobs(
                    request.host, request.workload, request.cgroup, request.since_unix_ms, limit
                )
            )

        return await self.worker.run(read)

    async def ListServices(
        self, request: fpb.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListServicesResponse:
        await valid(request, context)
        out = []
        for view in self.ops.services():
            if request.service and view.name != request.service:
                continue
            last = self.store.events(view.name, limit=50)
            transitions = [e for e in last if e.kind.endswith("-complete") or e.kind == "takeover-aborted"]
            out.append(service_message(view, transitions[-1] if transitions else None))
        if request.service and not out:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"service: no service {request.service!r} (see shadowctl services)"
            )
        return fpb.ListServicesResponse(services=out, controller=self.ops.cluster_state())

    async def Failover(
        self, request: fpb.FailoverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.TransitionReply:
        await require_operator(context, "failover")
        await valid(request, context)
        d = self.ops.request(request.service, Request("failover", request.to, request.force))
        return fpb.TransitionReply(accepted=d.accepted, reason=d.reason)

    async def Failback(
        self, request: fpb.FailbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.TransitionReply:
        await require_operator(context, "failback")
        await valid(request, context)
        d = self.ops.request(request.service, Request("failback"))
        return fpb.TransitionReply(accepted=d.accepted, reason=d.reason)

    async def ListEvents(
        self, request: fpb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListEventsResponse:
        await valid(request, context)
        limit = min(request.limit or 100, MAX_LIMIT)
        evs = await self.worker.run(lambda s: s.events(request.service, request.after_id, limit))
        return fpb.ListEventsResponse(events=[event_message(e) for e in evs])

    async def WatchEvents(
        self, request: fpb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fpb.Event]:
        await valid(request, context)
        q = self.events.subscribe()
        try:
            for e in self.store.events(
                request.service, request.after_id, min(request.limit or 20, MAX_LIMIT)
            ):
                yield event_message(e)
            while True:
                e = await q.get()
                if not request.service or e.service == request.service:
                    yield event_message(e)
        finally:
            self.events.unsubscribe(q)

    async def GetPlan(
        self, request: fpb.GetPlanRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.GetPlanResponse:
        await valid(request, context)
        now = now_ms()
        nxt, view = self.ops.plan(now), self.ops.scaling_view(now)
        if nxt is None or view is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "scaling is disabled ([scaling] enabled)"
            )
        assert nxt is not None and view is not None
        host, _, workload = request.workload.partition("/")
        service = request.workload if request.workload and not workload else ""
        if service and self.cfg.service_named(service) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"workload: {request.workload!r} is neither a service nor HOST/WORKLOAD (see shadowctl plan)",
            )

        def wanted(d_host: str, d_workload: str, d_service: str) -> bool:
            if service:
                return d_service == service
            return not request.workload or (d_host == host and d_workload == workload)

        last = self.store.decisions(last=request.last or 5)
        overrides = self.store.overrides()
        return fpb.GetPlanResponse(
            next=[decision_message(d) for d in nxt if wanted(d.host, d.workload, d.service)],
            last=[decision_message(d) for d in last if wanted(d.host, d.workload, d.service)],
            shadows=[
                shadow_message(v, overrides.get((v.host, v.workload)))
                for v in view.shadows
                if wanted(v.host, v.workload, v.service)
            ],
            next_cycle_unix_ms=view.next_cycle_ms,
        )

    async def ListZones(
        self, request: fpb.ListZonesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListZonesResponse:
        await valid(request, context)
        return zones_message(self.ops.zones(), self.cfg.pool.zone_degraded_share)

    async def GetPoolPlan(
        self, request: fpb.GetPoolPlanRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.PoolPlan:
        """The pool's plan, beside the configured shadows and the alternatives. The solve takes up to
        pool.time_limit_seconds in a process of its own; one at a time."""
        await valid(request, context)
        q = self.cfg.pool.demand_quantile
        demand = self.ops.pool_demand(q)
        if demand is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "scaling is disabled ([scaling] enabled): the pool reserves for forecast demand",
            )
        assert demand is not None
        live = {a.host for a in self.ops.agents()}
        down = {h.name for h in self.cfg.host if h.name not in live}
        down |= degraded_hosts(self.ops.zones()).keys()
        reported = {
            rec.host: (float(rec.hello.host_info.cpu_cores), int(rec.hello.host_info.memory_bytes))
            for rec in self.store.agents()
        }
        inputs = pool_inputs(self.cfg, reported, demand, down)
        p = self.cfg.pool
        options = PlanOptions(
            cover_zones=p.cover_zones, max_moves=p.max_moves, time_limit_seconds=p.time_limit_seconds
        )
        async with self._pool_lock:
            # the same inputs (nothing forecast, joined or lost since): the same plan, without a solve
            if self._pool_last is not None and self._pool_last[0] == (inputs, options):
                report = self._pool_last[1]
            else:
                report = await asyncio.to_thread(report_in_child, inputs, options)
                self._pool_last = ((inputs, options), report)
        return pool_plan_message(report, f"q{q:g} of each service's forecast, at its peak over the horizon")

    async def SetOverride(
        self, request: fpb.Override, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.OverrideReply:
        await require_operator(context, "changing a shadow's limits")
        await valid(request, context)
        who = peer_identity(context)
        o = replace(
            override_from_message(request),
            by=who.name if who else "plaintext client",
            unix_ms=now_ms(),
        )
        # Each workload as its agent announced it (role, service): holds apply to shadows only.
        workloads = [(a.host, w) for a in self.store.agents() for w in a.hello.workloads]
        known = {(host, w.name): ROLE_NAMES.get(w.role, "") for host, w in workloads}
        service = next((w.service for host, w in workloads if (host, w.name) == (o.host, o.workload)), "")
        shadows = tuple(
            f"{host}/{w.name}" for host, w in workloads if w.service == service and w.role == tpb.ROLE_SHADOW
        )
        problem = o.check(known, shadows)
        if problem:
            return fpb.OverrideReply(accepted=False, reason=problem)
        self.store.set_override(o)
        self.events.record(
            "override",
            "",
            o.host,
            f"{o.workload}: {o.kind} by {o.by}" + (f": {o.reason}" if o.reason else ""),
            cpu=o.cpu_cores or "-",
            memory=o.memory_bytes or "-",
        )
        self.ops.override_changed()  # applied now; the next cycle honours it instead of undoing it
        return fpb.OverrideReply(accepted=True, reason=f"{o.kind} recorded for {o.host}/{o.workload}")


async def valid(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Every request's fields are checked before anything is read or changed (fleet_messages.py)."""
    problem = request_problem(request)
    if problem:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


async def require_operator(context: grpc.aio.ServicerContext[Any, Any], what: str) -> None:
    """Changes need an operator certificate; reading needs only one the fleet CA signed."""
    who = peer_identity(context)
    if who is not None and who.role != "operator":
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{what} needs an operator certificate; {who.name!r} presented a {who.role!r} certificate "
            "(shadowctl certs issue NAME --role operator makes one)",
        )


def add_to_server(service: FleetService, server: grpc.aio.Server) -> None:
    """`add_FleetServicer_to_server`, except that GetTelemetry's reply is sent as the bytes
    `FleetService.GetTelemetry` returns (no response serializer): up to 10,000 rows, written in the store
    worker, are never decoded and encoded again on the event loop that answers lease renewals."""
    fgrpc.add_FleetServicer_to_server(service, _RawTelemetryReply(server))  # type: ignore[arg-type]


RAW_REPLY_METHOD = "GetTelemetry"


def _raw_reply(name: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    if not name.endswith(RAW_REPLY_METHOD):
        return handler
    return handler._replace(response_serializer=None)  # type: ignore[attr-defined, no-any-return]


class _RawGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self.inner.service(details)
        method = str(getattr(details, "method", ""))
        return _raw_reply(method, handler) if handler is not None else None


class _RawTelemetryReply:
    """The server, as the generated registration sees it: passes its handlers on, GetTelemetry's changed."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_RawGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.server.add_registered_method_handlers(
            service, {name: _raw_reply(name, h) for name, h in handlers.items()}
        )
