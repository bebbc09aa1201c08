"""Turns kernel counters and cgroup files into one WorkloadSample per workload per interval."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agentd.capture.bpf_capture import BpfCapture
from agentd.capture.kernel_counters import TCP_STATES, KernelCounters
from agentd.cgroupfs import CgroupLayout, CgroupReading, PressureReading, read_cgroup
from agentd.config import WorkloadConfig
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)

ROLES = {"primary": tpb.ROLE_PRIMARY, "shadow": tpb.ROLE_SHADOW}


def histogram(counts: Sequence[int], unit: str) -> tpb.Log2Histogram:
    n = len(counts)
    while n and not counts[n - 1]:
        n -= 1  # trailing empty buckets carry nothing
    return tpb.Log2Histogram(unit=unit, counts=list(counts[:n]))


def _delta(now: int | None, before: int | None) -> int:
    return max(0, now - before) if now is not None and before is not None else 0


def _pressure(now: PressureReading | None, before: PressureReading | None) -> tpb.Pressure:
    if now is None:
        return tpb.Pressure(available=False)
    return tpb.Pressure(
        available=True,
        some_avg10=now.some_avg10,
        full_avg10=now.full_avg10,
        some_stall_us=_delta(now.some_total_us, before.some_total_us if before else None),
        full_stall_us=_delta(now.full_total_us, before.full_total_us if before else None),
    )


def resources(now: CgroupReading, before: CgroupReading) -> tpb.Resources:
    return tpb.Resources(
        cpu_seconds=_delta(now.cpu_usage_ns, before.cpu_usage_ns) / 1e9,
        cpu_limit_cores=now.cpu_limit_cores,
        memory_bytes=now.memory_bytes or 0,
        memory_limit_bytes=now.memory_limit_bytes,
        io_read_bytes=_delta(now.io_read_bytes, before.io_read_bytes),
        io_write_bytes=_delta(now.io_write_bytes, before.io_write_bytes),
        tasks=now.tasks,
        cpu_pressure=_pressure(now.pressure.get("cpu"), before.pressure.get("cpu")),
        memory_pressure=_pressure(now.pressure.get("memory"), before.pressure.get("memory")),
        io_pressure=_pressure(now.pressure.get("io"), before.pressure.get("io")),
        cpu_throttled_us=_delta(now.cpu_throttled_us, before.cpu_throttled_us),
    )


def kernel_profile(
    d: KernelCounters, syscall_names: dict[int, str], sample_every: int
) -> tuple[tpb.SyscallProfile, tpb.BlockIOProfile, tpb.TcpProfile]:
    """Protobuf profiles from a delta of kernel counters."""
    by_name: dict[str, int] = {}
    for nr, n in enumerate(d.syscalls.by_nr):
        if n:
            name = syscall_names.get(nr, f"syscall_{nr}")
            by_name[name] = by_name.get(name, 0) + n
    sys = tpb.SyscallProfile(
        total=sum(d.syscalls.by_nr),
        by_name=by_name,
        latency=histogram(d.syscalls.latency_ns, "ns"),
        latency_sample_every=sample_every,
        latency_timed_seconds=d.syscalls.timed_ns / 1e9,
    )
    blk = tpb.BlockIOProfile(
        read_ops=d.block.read_ops,
        write_ops=d.block.write_ops,
        read_bytes=d.block.read_bytes,
        write_bytes=d.block.write_bytes,
        discard_ops=d.block.discard_ops,
        discard_bytes=d.block.discard_bytes,
        latency=histogram(d.block.latency_us, "us"),
    )
    tcp = tpb.TcpProfile(
        state_changes={TCP_STATES.get(s, str(s)): n for s, n in enumerate(d.tcp.state) if n},
        srtt=histogram(d.tcp.srtt_us, "us"),
        retransmits=d.tcp.retransmits,
        active_opens=d.tcp.state[2],
        resets_sent=d.tcp.resets_sent,
        resets_received=d.tcp.resets_received,
    )
    return sys, blk, tcp


@dataclass
class _Previous:
    at_ms: int
    kernel: KernelCounters
    cgroup: CgroupReading


class Collector:
    """Samples a set of workloads. Call `collect()` once per interval; each call covers the time since the
    previous one (the first since construction)."""

    def __init__(
        self,
        layout: CgroupLayout,
        workloads: list[WorkloadConfig],
        bpf: BpfCapture | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.layout, self.workloads, self.bpf, self.clock = layout, workloads, bpf, clock
        self._slots: dict[str, int] = {}
        self._prev: dict[str, _Previous] = {}
        self.refresh()
        for w in workloads:
            self._prev[w.name] = self._read(w)

    def refresh(self) -> None:
        """Re-map cgroup ids to workloads: descendants may have appeared since the last call."""
        if self.bpf is None:
            return
        assigned = self.bpf.assign({w.name: self.layout.cgroup_ids(w.cgroup) for w in self.workloads})
        self._slots = {n: a.slot for n, a in assigned.items()}
        for w in self.workloads:
            if not assigned[w.name].cgroup_ids:
                log.warning(
                    "workload %s: no cgroup v2 directory %s, so BPF cannot attribute its events",
                    w.name,
                    self.layout.v2_dir(w.cgroup),
                )

    def _read(self, w: WorkloadConfig) -> _Previous:
        kernel = self.bpf.read(self._slots[w.name]) if self.bpf is not None else KernelCounters()
        return _Previous(int(self.clock() * 1000), kernel, read_cgroup(self.layout, w.cgroup))

    def collect(self) -> list[tpb.WorkloadSample]:
        self.refresh()
        out = []
        for w in self.workloads:
            now = self._read(w)
            before = self._prev[w.name]
            self._prev[w.name] = now
            sample = tpb.WorkloadSample(
                workload=w.name,
                cgroup=w.cgroup,
                start_unix_ms=before.at_ms,
                end_unix_ms=now.at_ms,
                resources=resources(now.cgroup, before.cgroup),
            )
            if self.bpf is not None:
                sys, blk, tcp = kernel_profile(
                    now.kernel.minus(before.kernel), self.bpf.syscall_names, self.bpf.sample_every
                )
                sample.syscalls.CopyFrom(sys)
                sample.block_io.CopyFrom(blk)
                sample.tcp.CopyFrom(tcp)
            out.append(sample)
        return out
