"""Rows for `shadowctl hosts` and `shadowctl top`, built from API messages by pure functions."""

from __future__ import annotations

import time
from typing import Any

from shadowplane.histogram import quantile
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import telemetry_pb2 as tpb

HEALTH = {
    fpb.HOST_HEALTH_HEALTHY: "healthy",
    fpb.HOST_HEALTH_STALE: "stale",
    fpb.HOST_HEALTH_DOWN: "down",
}
ROLE = {tpb.ROLE_PRIMARY: "primary", tpb.ROLE_SHADOW: "shadow"}


def host_row(h: fpb.HostStatus, now_ms: int | None = None) -> dict[str, Any]:
    now_ms = now_ms or int(time.time() * 1000)
    return {
        "host": h.host,
        "health": HEALTH.get(h.health, "unknown"),
        "connected": h.connected,
        "zone": h.host_info.zone,
        "workloads": [
            {"name": w.name, "cgroup": w.cgroup, "role": ROLE.get(w.role, "?"), "service": w.service}
            for w in h.workloads
        ],
        "bpf": h.capture.bpf_active,
        "bpf_unavailable_reason": h.capture.bpf_unavailable_reason,
        "capture_features": [
            {"name": f.name, "captured": f.captured, "detail": f.detail} for f in h.capture.features
        ],
        "dropped_events": {k: v for k, v in h.capture.dropped_events.items() if v},
        "last_seen_seconds_ago": round((now_ms - h.last_seen_unix_ms) / 1000, 1)
        if h.last_seen_unix_ms
        else None,
        "agent_version": h.agent_version,
        "peer": h.peer,
        "cpu_cores": h.host_info.cpu_cores,
        "memory_bytes": h.host_info.memory_bytes,
    }


def _q(h: tpb.Log2Histogram, q: float) -> float | None:
    return quantile(list(h.counts), q)


def sample_row(host: str, role: str, s: tpb.WorkloadSample, now_ms: int | None = None) -> dict[str, Any]:
    """Per-second rates and latency quantiles of one sample."""
    now_ms = now_ms or int(time.time() * 1000)
    secs = max(1e-3, (s.end_unix_ms - s.start_unix_ms) / 1000)
    top = sorted(s.syscalls.by_name.items(), key=lambda kv: -kv[1])[:3]
    b, t, r = s.block_io, s.tcp, s.resources
    return {
        "host": host,
        "workload": s.workload,
        "role": role,
        "cgroup": s.cgroup,
        "end_unix_ms": s.end_unix_ms,
        "age_seconds": round((now_ms - s.end_unix_ms) / 1000, 1),
        "cpu_cores": round(r.cpu_seconds / secs, 3),
        "cpu_limit_cores": r.cpu_limit_cores,
        "memory_bytes": r.memory_bytes,
        "memory_limit_bytes": r.memory_limit_bytes,
        "syscalls_per_second": round(s.syscalls.total / secs, 1),
        "top_syscalls": {k: round(v / secs, 1) for k, v in top},
        "syscall_latency_p99_seconds": _scale(_q(s.syscalls.latency, 0.99), 1e-9),
        "disk_ops_per_second": round((b.read_ops + b.write_ops) / secs, 1),
        "disk_bytes_per_second": round((b.read_bytes + b.write_bytes) / secs, 1),
        "disk_latency_p99_seconds": _scale(_q(b.latency, 0.99), 1e-6),
        "tcp_srtt_p50_seconds": _scale(_q(t.srtt, 0.5), 1e-6),
        "tcp_retransmits": t.retransmits,
        "tcp_state_changes": dict(t.state_changes),
        "cpu_pressure_some_avg10": r.cpu_pressure.some_avg10 if r.cpu_pressure.available else None,
    }


def _scale(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.0f}us"
    if v < 1:
        return f"{v * 1e3:.1f}ms"
    return f"{v:.2f}s"


def fmt_bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}TiB"
