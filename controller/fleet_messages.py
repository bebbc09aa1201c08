"""The Fleet API's protobuf messages from and to the controller's own data: the one place they meet.

The controller plans, records and reports with plain frozen dataclasses (its status view, scaling decisions,
overrides, events); the Fleet API (fleet_api.py) turns them into its messages here, and an operator's
override back into data. Every request is checked here first (`request_problem`), field by field, before
any of it reaches the store or a decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from controller.pool.model import Coverage
from controller.pool.report import PoolReport
from controller.pool.zones import ZoneHealth
from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.status import CaptureView, ServiceView, ShadowView
from controller.store.base import AgentRecord, EventRecord
from shadowplane.config import NAME_RE
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import telemetry_pb2 as tpb

MAX_LIMIT = 10_000  # rows one call may ask for (telemetry per workload, events, decisions)
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
        features=[tpb.CaptureFeature(name=f.name, captured=f.captured, detail=f.detail) for f in c.features],
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


# ---- what a caller may send ----
#
# Every field of every request is checked by its type (text: printable and not huge; integers: what the
# store's 64-bit signed columns hold; reals: finite and not negative), and the fields below by what they
# mean. A problem is "FIELD: must ..., got VALUE", so the caller knows what to change.

MAX_TEXT = 4096
MAX_STORED_INT = 2**63 - 1  # SQLite's INTEGER


def _shown(v: object) -> str:
    """A value as an error quotes it: never the whole of a huge one (the detail travels in a header)."""
    if isinstance(v, str) and len(v) > 40:
        return f"{v[:40]!r}... ({len(v)} characters)"
    return repr(v)


def _name(v: str) -> str | None:
    return None if NAME_RE.match(v) else "must be a name of 1-63 letters, digits, '_', '.', '-'"


def _required(rule: Callable[[str], str | None], see: str) -> Callable[[str], str | None]:
    return lambda v: f"is required ({see})" if v == "" else rule(v)


def _optional(rule: Callable[[str], str | None]) -> Callable[[str], str | None]:
    return lambda v: None if v == "" else rule(v)


def _cgroup(v: str) -> str | None:
    return (
        None if v.startswith("/") else "must be a cgroup path starting with '/', e.g. /shadowplane.slice/web"
    )


def _workload_or_service(v: str) -> str | None:
    if all(NAME_RE.match(part) for part in v.split("/")) and v.count("/") <= 1:
        return None
    return "must be HOST/WORKLOAD or a service name (see shadowctl plan)"


def _at_most(n: int) -> Callable[[int], str | None]:
    return lambda v: f"must be at most {n}" if v > n else None


_NAME = _optional(_name)
_SERVICE = _required(_name, "see shadowctl services")
# (message, field) -> what the field's value must be; "" passes unless the field is required.
FIELD_RULES: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("GetTelemetryRequest", "host"): _required(_name, "see ListHosts for names"),
    ("GetTelemetryRequest", "workload"): _NAME,
    ("GetTelemetryRequest", "cgroup"): _optional(_cgroup),
    ("GetTelemetryRequest", "limit"): _at_most(MAX_LIMIT),
    ("ListServicesRequest", "service"): _NAME,
    ("FailoverRequest", "service"): _SERVICE,
    ("FailoverRequest", "to"): _NAME,
    ("FailbackRequest", "service"): _SERVICE,
    ("ListEventsRequest", "service"): _NAME,
    ("GetPlanRequest", "workload"): _optional(_workload_or_service),
    ("GetPlanRequest", "last"): _at_most(MAX_LIMIT),
    ("Override", "host"): _required(_name, "the shadow host, see shadowctl plan"),
    ("Override", "workload"): _required(_name, "the shadow workload, see shadowctl plan"),
}
# Fields the controller fills in itself, whatever the caller sent.
IGNORED = {("Override", "by"), ("Override", "unix_ms")}


def _by_type(field_type: int, v: Any) -> str | None:
    if field_type == FieldDescriptor.TYPE_STRING:
        if len(v) > MAX_TEXT:
            return f"must be at most {MAX_TEXT} characters"
        if not v.isprintable():
            return "must be printable text (no control, format or line-break characters)"
    elif field_type == FieldDescriptor.TYPE_DOUBLE:
        if not math.isfinite(v) or v < 0:
            return "must be a finite number, 0 or more"
    elif field_type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT64) and v > MAX_STORED_INT:
        return f"must be at most 2^63-1 ({MAX_STORED_INT})"
    return None


def request_problem(request: Message, prefix: str = "") -> str | None:
    """What is wrong with a Fleet request, as "FIELD: must ..., got VALUE"; None if nothing is."""
    kind = request.DESCRIPTOR.name
    for fd in request.DESCRIPTOR.fields:
        if (kind, fd.name) in IGNORED:
            continue
        if fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.is_repeated and not request.HasField(fd.name):
            continue  # a message left out: nothing in it to check
        name, value, rule = prefix + fd.name, getattr(request, fd.name), FIELD_RULES.get((kind, fd.name))
        # The requests have no repeated, map or nested fields today; one added later is checked too.
        problems: Iterator[str | None]
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key, item = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            problems = (
                _value_problem(key.type, k, f"{name} (a key)", None)
                or _value_problem(item.type, v, f"{name}[{k!r}]", None)
                for k, v in value.items()
            )
        elif fd.is_repeated:
            problems = (_value_problem(fd.type, v, f"{name}[{i}]", rule) for i, v in enumerate(value))
        else:
            problems = iter([_value_problem(fd.type, value, name, rule)])
        problem = next((p for p in problems if p), None)
        if problem:
            return problem
    return None


def _value_problem(
    field_type: int, v: Any, shown: str, rule: Callable[[Any], str | None] | None
) -> str | None:
    if field_type == FieldDescriptor.TYPE_MESSAGE:
        return request_problem(v, shown + ".")
    problem = _by_type(field_type, v) or (rule(v) if rule else None)
    return f"{shown}: {problem}, got {_shown(v)}" if problem else None


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


def zones_message(zones: tuple[ZoneHealth, ...], share: float) -> fpb.ListZonesResponse:
    return fpb.ListZonesResponse(
        zones=[
            fpb.ZoneStatus(
                zone=z.zone,
                hosts=list(z.hosts),
                down=[h for h, _ in z.down],
                down_reasons=[why for _, why in z.down],
                degraded=z.degraded,
                reason=z.reason,
            )
            for z in zones
        ],
        degraded_share=share,
    )


def pool_plan_message(r: PoolReport, demand: str) -> fpb.PoolPlan:
    zone = {h.name: h.zone for h in r.inputs.hosts}
    moves = {m.service: m.reason for m in r.plan.moves}
    unplaced = dict(r.plan.unplaced) | dict(r.inputs.not_placed)
    configured = dict(r.inputs.configured)
    services = []
    for s in r.inputs.services:
        shadow = r.plan.shadow_of(s.name) or ""
        services.append(
            fpb.PoolService(
                service=s.name,
                primary=s.primary,
                zone=zone.get(s.primary, ""),
                tier=s.tier,
                cpu_cores=s.cpu_cores,
                memory_bytes=s.memory_bytes,
                shadow=shadow,
                configured=configured.get(s.name, ""),
                note=unplaced.get(s.name, "") if not shadow else moves.get(s.name, ""),
            )
        )
    for name, why in r.inputs.not_placed:
        services.append(fpb.PoolService(service=name, configured=configured.get(name, ""), note=why))

    def coverage(name: str, c: Coverage, note: str = "") -> fpb.PoolCoverage:
        return fpb.PoolCoverage(
            name=name,
            price_per_hour=c.price_per_hour,
            reserved_cores=sum(x.cores for x in c.reserves),
            host_scenarios=c.host_scenarios,
            host_covered=c.host_covered,
            zone_scenarios=c.zone_scenarios,
            zone_covered=c.zone_covered,
            shortfalls=[f"{f.scenario}: {f.service}: {f.why}" for f in c.shortfalls],
            note=note,
        )

    placements = [
        coverage("pool", r.plan.coverage, f"{len(r.plan.moves)} shadows differ from the configured ones"),
        coverage("configured", r.configured_coverage, "the first shadow each service's config names"),
    ] + [
        fpb.PoolCoverage(
            name=a.name,
            price_per_hour=a.price_per_hour,
            reserved_cores=a.reserved_cores,
            host_scenarios=a.host_scenarios,
            host_covered=a.host_covered,
            zone_scenarios=a.zone_scenarios,
            zone_covered=a.zone_covered,
            note=a.note,
        )
        for a in r.alternatives
    ]
    return fpb.PoolPlan(
        services=services,
        reserves=[
            fpb.PoolReserve(
                host=x.host,
                zone=zone.get(x.host, ""),
                cores=x.cores,
                memory_bytes=x.memory_bytes,
                price_per_hour=x.price_per_hour,
                worst=x.worst,
                dedicated=x.dedicated,
            )
            for x in r.plan.reserves
        ],
        placements=placements,
        solver=r.plan.solver,
        solve_seconds=r.plan.solve_seconds,
        demand=demand,
        notes=list(r.inputs.notes),
    )
