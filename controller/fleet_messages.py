"""The Fleet API's protobuf messages from and to the controller's own data: the one place they meet.

The controller plans, records and reports with plain frozen dataclasses (its status view, scaling decisions,
overrides, events); the Fleet API (fleet_api.py) turns them into its messages here, and an operator's
override back into data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.status import CaptureView, ServiceView, ShadowView
from controller.store.base import AgentRecord, EventRecord
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import telemetry_pb2 as tpb

M = TypeVar("M", fpb.ScalingDecision, fpb.Override)
R = TypeVar("R", ScalingDecision, Override)


# A decision's and an override's messages have the dataclasses' field names (and, for decisions, one map):
# the conversion goes field by field, so a field added to both needs no code here.


def _fields(source: object, names: type[ScalingDecision | Override]) -> dict[str, Any]:
    """`source`'s values of the dataclass's fields, maps as plain dicts."""
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(names)}
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}


def _to_message(record: ScalingDecision | Override, message: type[M]) -> M:
    return message(**_fields(record, type(record)))


def _from_message(m: fpb.ScalingDecision | fpb.Override, record: type[R]) -> R:
    return record(**_fields(m, record))


def decision_message(d: ScalingDecision) -> fpb.ScalingDecision:
    return _to_message(d, fpb.ScalingDecision)


def decision_from_message(m: fpb.ScalingDecision) -> ScalingDecision:
    return _from_message(m, ScalingDecision)


def override_message(o: Override) -> fpb.Override:
    return _to_message(o, fpb.Override)


def override_from_message(m: fpb.Override) -> Override:
    return _from_message(m, Override)


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


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def telemetry_response_bytes(rows: list[tuple[str, bytes]]) -> bytes:
    """A serialized GetTelemetryResponse of (host, serialized WorkloadSample) rows, written directly in the
    wire format (field 1 `samples`, each a StoredSample of field 1 `host` and field 2 `sample`) without
    decoding a single sample. For 10,000 rows (1.5 MB) this saves decoding, copying and encoding them
    again, work that holds the GIL the event loop needs (encoding alone holds it ~5 ms at once)."""
    parts = []
    for host, blob in rows:
        h = host.encode()
        inner = b"\x0a" + _varint(len(h)) + h + b"\x12" + _varint(len(blob)) + blob
        parts.append(b"\x0a" + _varint(len(inner)) + inner)
    return b"".join(parts)
