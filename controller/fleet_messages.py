"""The Fleet API's protobuf messages from and to the controller's own data: the one place they meet.

The controller plans, records and reports with plain frozen dataclasses; the Fleet API (fleet_api.py) and the
store's encoding of decisions and overrides (whose bytes are these messages, as since 0.1.0) convert here.
"""

from __future__ import annotations

from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.status import CaptureView, ServiceView, ShadowView
from controller.store.base import AgentRecord, EventRecord
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import telemetry_pb2 as tpb


def decision_message(d: ScalingDecision) -> fpb.ScalingDecision:
    return fpb.ScalingDecision(
        id=d.id,
        unix_ms=d.unix_ms,
        service=d.service,
        host=d.host,
        workload=d.workload,
        resource=d.resource,
        demand_from=d.demand_from,
        forecast=dict(d.forecast),
        predicted=d.predicted,
        old=d.old,
        new=d.new,
        branch=d.branch,
        clamps=d.clamps,
        result=d.result,
        applied=d.applied,
        forecast_source=d.forecast_source,
    )


def decision_from_message(m: fpb.ScalingDecision) -> ScalingDecision:
    return ScalingDecision(
        unix_ms=m.unix_ms,
        service=m.service,
        host=m.host,
        workload=m.workload,
        resource=m.resource,
        demand_from=m.demand_from,
        forecast=dict(m.forecast),
        predicted=m.predicted,
        old=m.old,
        new=m.new,
        branch=m.branch,
        clamps=m.clamps,
        forecast_source=m.forecast_source,
        result=m.result,
        applied=m.applied,
        id=m.id,
    )


def override_message(o: Override) -> fpb.Override:
    return fpb.Override(
        host=o.host,
        workload=o.workload,
        kind=o.kind,
        cpu_cores=o.cpu_cores,
        memory_bytes=o.memory_bytes,
        cpu_min=o.cpu_min,
        cpu_max=o.cpu_max,
        memory_min=o.memory_min,
        memory_max=o.memory_max,
        reason=o.reason,
        by=o.by,
        unix_ms=o.unix_ms,
    )


def override_from_message(m: fpb.Override) -> Override:
    return Override(
        host=m.host,
        workload=m.workload,
        kind=m.kind,
        cpu_cores=m.cpu_cores,
        memory_bytes=m.memory_bytes,
        cpu_min=m.cpu_min,
        cpu_max=m.cpu_max,
        memory_min=m.memory_min,
        memory_max=m.memory_max,
        reason=m.reason,
        by=m.by,
        unix_ms=m.unix_ms,
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


def capture_message(c: CaptureView) -> tpb.CaptureStatus:
    return tpb.CaptureStatus(
        bpf_active=c.bpf_active,
        bpf_unavailable_reason=c.bpf_unavailable_reason,
        dropped_events=dict(c.dropped_events or {}),
        telemetry_batches_dropped=c.telemetry_batches_dropped,
    )


def host_health(rec: AgentRecord, connected: bool, now_ms: int, stale_after_intervals: float) -> int:
    if not connected:
        return int(fpb.HOST_HEALTH_DOWN)
    interval = rec.hello.interval_ms or 10_000
    if now_ms - max(rec.last_telemetry_ms, rec.first_seen_ms) > stale_after_intervals * interval:
        return int(fpb.HOST_HEALTH_STALE)
    return int(fpb.HOST_HEALTH_HEALTHY)


def host_status(rec: AgentRecord, connected: bool, now: int, stale_after: float) -> fpb.HostStatus:
    """A host as the store knows it (its agent's latest hello); the caller adds what its live stream says."""
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


def service_message(v: ServiceView, last_transition: EventRecord | None) -> fpb.ServiceStatus:
    st = fpb.ServiceStatus(
        name=v.name,
        vip=v.vip,
        primary=v.primary,
        shadows=v.shadows,
        owner=v.owner,
        token=v.token,
        phase=v.phase,
        observers=[
            fpb.ObserverView(
                observer=o.observer, target=o.target, up=bool(o.up), known=o.up is not None, detail=o.detail
            )
            for o in v.observers
        ],
        failback=v.failback,
        primary_healthy_since_unix_ms=v.primary_healthy_since_ms or 0,
    )
    if last_transition is not None:
        st.last_transition.CopyFrom(event_message(last_transition))
    return st


def shadow_message(v: ShadowView, override: Override | None) -> fpb.ShadowState:
    st = fpb.ShadowState(
        service=v.service,
        host=v.host,
        workload=v.workload,
        ready=v.ready,
        reason=v.reason,
        cpu_cores=v.cpu_cores or 0.0,
        memory_bytes=v.memory_bytes or 0,
    )
    if override is not None:
        st.override.CopyFrom(override_message(override))
    return st
