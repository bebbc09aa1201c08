"""cgroup limits of a workload: write them, then read back what the kernel now says.

v2: cpu.max, memory.max (+ memory.high at 90 % so reclaim starts before the OOM killer), io.weight.
v1: cpu.cfs_quota_us / cpu.cfs_period_us, memory.limit_in_bytes, blkio.weight.
"""

from __future__ import annotations

from pathlib import Path

from agentd.cgroupfs import UNLIMITED_V1, CgroupLayout, read_cgroup
from shadowplane.v1 import agent_pb2 as apb

CPU_PERIOD_US = 100_000
MEMORY_HIGH_FRACTION = 0.9


class LimitsError(RuntimeError):
    pass


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        raise LimitsError(
            f"{path} does not exist: is the workload's cgroup there (and the controller on)?"
        ) from None
    except OSError as e:
        raise LimitsError(f"cannot write {value!r} to {path}: {e.strerror}") from None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def apply_limits(layout: CgroupLayout, cgroup: str, s: apb.SetLimits) -> apb.LimitsApplied:
    """Apply CPU, memory and I/O weight limits. Memory is never set below what the cgroup uses now: the
    limit is raised to the usage (the kernel would otherwise reclaim or kill to meet it)."""
    if s.cpu_cores < 0:
        raise LimitsError(f"cpu_cores {s.cpu_cores} is negative")
    now = read_cgroup(layout, cgroup)
    in_use = now.memory_bytes or 0
    memory = max(s.memory_bytes, in_use) if s.memory_bytes else 0
    quota = round(s.cpu_cores * CPU_PERIOD_US) if s.cpu_cores else 0
    if s.cpu_cores and quota < 1000:
        quota = 1000  # the kernel's minimum quota is 1 ms
    if layout.mode == "v2":
        d = layout.v2_dir(cgroup)
        assert d is not None
        _write(d / "cpu.max", f"{quota if quota else 'max'} {CPU_PERIOD_US}")
        _write(d / "memory.max", str(memory) if memory else "max")
        _write(d / "memory.high", str(int(memory * MEMORY_HIGH_FRACTION)) if memory else "max")
        if s.io_weight and (d / "io.weight").exists():
            _write(d / "io.weight", f"default {s.io_weight}")
    else:
        cpu = layout.controller_dir("cpu", cgroup)
        mem = layout.controller_dir("memory", cgroup)
        if cpu is None or mem is None:
            raise LimitsError("this host has no v1 cpu or memory controller mounted")
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota) if quota else "-1")
        _write(mem / "memory.limit_in_bytes", str(memory) if memory else "-1")
        blkio = layout.controller_dir("blkio", cgroup)
        if s.io_weight and blkio is not None and (blkio / "blkio.weight").exists():
            _write(blkio / "blkio.weight", str(max(10, min(1000, s.io_weight))))
    return read_limits(layout, cgroup, s.workload)


def read_limits(layout: CgroupLayout, cgroup: str, workload: str) -> apb.LimitsApplied:
    r = read_cgroup(layout, cgroup)
    weight = 0
    if layout.mode == "v2":
        d = layout.v2_dir(cgroup)
        text = _read(d / "io.weight") if d else None
        if text:
            weight = int(text.split()[-1])
    else:
        blkio = layout.controller_dir("blkio", cgroup)
        text = _read(blkio / "blkio.weight") if blkio else None
        if text and text.isdigit():
            weight = int(text)
    return apb.LimitsApplied(
        workload=workload,
        cpu_cores=r.cpu_limit_cores,
        memory_bytes=r.memory_limit_bytes if r.memory_limit_bytes < UNLIMITED_V1 else 0,
        io_weight=weight,
        memory_in_use_bytes=r.memory_bytes or 0,
    )
