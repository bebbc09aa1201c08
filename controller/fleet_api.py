"""The Fleet service: what `shadowctl` and fleet tooling read and ask."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from controller.config import ControllerConfig
from controller.events import EventLog
from controller.failover.decide import Request
from controller.failover.loop import FailoverLoop, ServiceRuntime
from controller.registry import AgentRegistry
from controller.scaling.loop import ScalingLoop
from controller.store import AgentRecord, EventRecord, Store
from shadowplane.tls import peer_identity
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
    def __init__(
        self,
        cfg: ControllerConfig,
        store: Store,
        registry: AgentRegistry,
        events: EventLog,
        failover: FailoverLoop,
        scaling: ScalingLoop | None = None,
    ) -> None:
        self.cfg, self.store, self.registry, self.events = cfg, store, registry, events
        self.failover, self.scaling = failover, scaling

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

    async def ListServices(
        self, request: fpb.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListServicesResponse:
        out = []
        for name, rt in self.failover.services.items():
            if request.service and name != request.service:
                continue
            out.append(self._service_status(rt))
        if request.service and not out:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service!r}")
        return fpb.ListServicesResponse(services=out)

    def _service_status(self, rt: ServiceRuntime) -> fpb.ServiceStatus:
        rec = self.failover.orchestrator.record(rt.cfg.name)
        views = []
        for target in rt.targets():
            for observer, (up, detail) in self.failover.views(rt, target).items():
                views.append(
                    fpb.ObserverView(
                        observer=observer, target=target, up=bool(up), known=up is not None, detail=detail
                    )
                )
        last = self.store.events(rt.cfg.name, limit=50)
        transitions = [e for e in last if e.kind.endswith("-complete") or e.kind == "takeover-aborted"]
        phase = "transition" if rt.busy else rec.phase
        st = fpb.ServiceStatus(
            name=rt.cfg.name,
            vip=rt.cfg.vip,
            primary=rt.cfg.primary,
            shadows=rt.cfg.shadows,
            owner=rec.owner,
            token=rec.token,
            phase=phase,
            observers=views,
            failback=rt.cfg.failback,
            primary_healthy_since_unix_ms=rt.primary_up_since_ms or 0,
        )
        if transitions:
            st.last_transition.CopyFrom(event_message(transitions[-1]))
        return st

    async def Failover(
        self, request: fpb.FailoverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.TransitionReply:
        await require_operator(context, "failover")
        d = self.failover.request(request.service, Request("failover", request.to, request.force))
        return fpb.TransitionReply(accepted=d.accepted, reason=d.reason)

    async def Failback(
        self, request: fpb.FailbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.TransitionReply:
        await require_operator(context, "failback")
        d = self.failover.request(request.service, Request("failback"))
        return fpb.TransitionReply(accepted=d.accepted, reason=d.reason)

    async def ListEvents(
        self, request: fpb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.ListEventsResponse:
        limit = min(request.limit or 100, MAX_LIMIT)
        evs = self.store.events(request.service, request.after_id, limit)
        return fpb.ListEventsResponse(events=[event_message(e) for e in evs])

    async def WatchEvents(
        self, request: fpb.ListEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fpb.Event]:
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
        if self.scaling is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "scaling is disabled ([scaling] enabled)"
            )
        assert self.scaling is not None
        host, _, workload = request.workload.partition("/")
        service = request.workload if request.workload and not workload else ""
        if service and self.cfg.service_named(service) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"{request.workload!r} is neither a service nor HOST/WORKLOAD"
            )

        def wanted(d_host: str, d_workload: str, d_service: str) -> bool:
            if service:
                return d_service == service
            return not request.workload or (d_host == host and d_workload == workload)

        nxt = [d for d in self.scaling.plan(int(time.time() * 1000)) if wanted(d.host, d.workload, d.service)]
        last = [
            d for d in self.store.decisions(last=request.last or 5) if wanted(d.host, d.workload, d.service)
        ]
        return fpb.GetPlanResponse(
            next=nxt, last=last, shadows=self._shadows(wanted), next_cycle_unix_ms=self.scaling.next_cycle_ms
        )

    def _shadows(self, wanted: Callable[[str, str, str], bool]) -> list[fpb.ShadowState]:
        assert self.scaling is not None
        overrides = self.store.overrides()
        out = []
        for svc in self.cfg.service:
            for h in svc.shadows:
                w = self.scaling.workload_of(h, svc.name)
                if not wanted(h, w, svc.name):
                    continue
                rd = self.scaling.readiness.get((h, w))
                applied = self.scaling.applied.get((h, w))
                st = fpb.ShadowState(
                    service=svc.name,
                    host=h,
                    workload=w,
                    ready=bool(rd and rd.ready),
                    reason=rd.reason if rd else "not sized yet",
                    cpu_cores=applied.cpu_cores if applied else 0.0,
                    memory_bytes=applied.memory_bytes if applied else 0,
                )
                if (h, w) in overrides:
                    st.override.CopyFrom(overrides[(h, w)])
                out.append(st)
        return out

    async def SetOverride(
        self, request: fpb.Override, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.OverrideReply:
        await require_operator(context, "changing a shadow's limits")
        problem = check_override(
            request, {(a.host, w.name) for a in self.store.agents() for w in a.hello.workloads}
        )
        if problem:
            return fpb.OverrideReply(accepted=False, reason=problem)
        o = fpb.Override()
        o.CopyFrom(request)
        who = peer_identity(context)
        o.by = who.name if who else "plaintext client"
        o.unix_ms = int(time.time() * 1000)
        self.store.set_override(o)
        self.events.record(
            "override",
            "",
            o.host,
            f"{o.workload}: {o.kind} by {o.by}" + (f": {o.reason}" if o.reason else ""),
            cpu=o.cpu_cores or "-",
            memory=o.memory_bytes or "-",
        )
        if self.scaling is not None:
            self.scaling.wake.set()  # applied now; the next cycle honours it instead of undoing it
        return fpb.OverrideReply(accepted=True, reason=f"{o.kind} recorded for {o.host}/{o.workload}")


def check_override(o: fpb.Override, known: set[tuple[str, str]]) -> str | None:
    if o.kind not in ("pin", "bound", "freeze", "clear"):
        return f"kind must be pin, bound, freeze or clear, not {o.kind!r}"
    if (o.host, o.workload) not in known:
        return f"no workload {o.workload!r} on host {o.host!r} (see shadowctl plan)"
    if o.kind == "pin" and o.cpu_cores <= 0 and o.memory_bytes == 0:
        return "pin needs a CPU and/or a memory value"
    if o.cpu_cores < 0 or o.cpu_min < 0 or o.cpu_max < 0:
        return "CPU values must not be negative"
    if o.kind == "bound" and o.cpu_max and o.cpu_min > o.cpu_max:
        return "bound: the CPU minimum is above the maximum"
    if o.kind == "bound" and o.memory_max and o.memory_min > o.memory_max:
        return "bound: the memory minimum is above the maximum"
    return None


async def require_operator(context: grpc.aio.ServicerContext[Any, Any], what: str) -> None:
    """Changes need an operator certificate; reading needs only one the fleet CA signed."""
    who = peer_identity(context)
    if who is not None and who.role != "operator":
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{what} needs an operator certificate; {who.name!r} presented a {who.role!r} certificate "
            "(shadowctl certs issue NAME --role operator makes one)",
        )


def event_message(e: EventRecord) -> fpb.Event:
    return fpb.Event(
        id=e.id,
        unix_ms=e.unix_ms,
        kind=e.kind,
        service=e.service,
        host=e.host,
        reason=e.reason,
        detail=e.detail,
    )


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
