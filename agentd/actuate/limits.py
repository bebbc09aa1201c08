"""cgroup limits of a workload: what it should hold, writing that (into cgroupfs here, or through systemd:
agentd.actuate.systemd_units), and reading back what the kernel holds, every interval, re-applying what
something else reset.

v2: cpu.max, memory.max (+ memory.high at 90 % so reclaim starts before the OOM killer), io.weight.
v1: cpu.cfs_quota_us / cpu.cfs_period_us, memory.limit_in_bytes, blkio.weight.

A shadow is ready only while the kernel holds its limits. On a systemd host, `systemctl daemon-reload`
re-applies every unit's own settings to its cgroup and so resets limits written into it directly (issue 11);
limits set through systemd survive it. Either way the agent re-reads the files each interval (`check`),
writes again what was reset, logs it, and tells the controller in each sample (Resources.limits_problem,
limits_reapplied).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agentd.cgroupfs import UNLIMITED_V1, CgroupLayout, read_cgroup
from shadowplane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
# Quotas in steps of 1 % of a core: systemd writes the CPUQuota= that a daemon-reload reads back into its
# drop-in in whole percent, truncated (hundredths in releases after some), so a finer quota set through it
# would come back different; and the kernel's smallest quota is 1 ms. The same rule for direct writes keeps
# both backends' limits comparable.
CPU_QUOTA_STEP_US = 1000
MEMORY_HIGH_FRACTION = 0.9
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")  # memory.max reads back rounded down to whole pages


class LimitsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    """What a workload's cgroup should hold. 0 = no limit; io_weight 0 = leave as it is."""

    cpu_quota_us: int  # per CPU_PERIOD_US
    memory_max: int
    memory_high: int
    io_weight: int

    @property
    def cpu_cores(self) -> float:
        return self.cpu_quota_us / CPU_PERIOD_US


def _pages(n: int) -> int:
    return -(-n // PAGE_BYTES) * PAGE_BYTES


def plan(s: apb.SetLimits, memory_in_use: int) -> Limits:
    """The limits for a SetLimits. Memory is never set below what the cgroup uses now: the limit is raised to
    the usage (the kernel would otherwise reclaim or kill to meet it)."""
    if s.cpu_cores < 0:
        raise LimitsError(f"cpu_cores {s.cpu_cores} is negative")
    quota = 0
    if s.cpu_cores:
        quota = max(
            CPU_QUOTA_STEP_US, round(s.cpu_cores * CPU_PERIOD_US / CPU_QUOTA_STEP_US) * CPU_QUOTA_STEP_US
        )
    memory = _pages(max(s.memory_bytes, memory_in_use)) if s.memory_bytes else 0
    high = _pages(int(memory * MEMORY_HIGH_FRACTION)) if memory else 0
    weight = max(1, min(10_000, s.io_weight)) if s.io_weight else 0
    return Limits(quota, memory, high, weight)


@dataclass(frozen=True)
class Held:
    """What the kernel holds now, read from the cgroup's files. None: no such file (the cgroup or its
    controller is missing). 0 = no limit."""

    cpu_quota_us: int | None
    memory_max: int | None
    memory_high: int | None  # v1 has none: None there
    io_weight: int | None


def mismatches(want: Limits, held: Held) -> tuple[str, ...]:
    """Each limit the kernel does not hold as `want` says, in words ("cpu.max is max, want 150000")."""
    out = []
    for name, w, h in (
        ("cpu.max", want.cpu_quota_us, held.cpu_quota_us),
        ("memory.max", want.memory_max, held.memory_max),
        ("memory.high", want.memory_high, held.memory_high),
    ):
        if h is None:
            # No file, no limit: held if none is wanted. v1 has no memory.high; on v2 memory.max, of the same
            # controller, says it is missing.
            if w and name != "memory.high":
                out.append(f"{name} is missing")
        elif h != w:
            out.append(f"{name} is {h or 'max'}, want {w or 'max'}")
    # io weights need a scheduler that honours them; a host without the file is told at apply time, and the
    # workload is no less ready for lacking one.
    if want.io_weight and held.io_weight is not None and held.io_weight != want.io_weight:
        out.append(f"io.weight is {held.io_weight}, want {want.io_weight}")
    return tuple(out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(text: str | None, unlimited: str) -> int | None:
    if text is None:
        return None
    return 0 if text == unlimited else int(text)


def read_held(layout: CgroupLayout, cgroup: str) -> Held:
    if layout.mode == "v2":
        d = layout.v2_dir(cgroup)
        assert d is not None
        cpu = _read(d / "cpu.max")
        quota = None
        if cpu is not None:
            q, _, period = cpu.partition(" ")
            quota = 0 if q == "max" else round(int(q) * CPU_PERIOD_US / int(period or CPU_PERIOD_US))
        weight = _read(d / "io.weight")
        return Held(
            quota,
            _number(_read(d / "memory.max"), "max"),
            _number(_read(d / "memory.high"), "max"),
            int(weight.splitlines()[0].split()[-1]) if weight else None,
        )
    cpu_d, mem_d, blkio_d = (layout.controller_dir(c, cgroup) for c in ("cpu", "memory", "blkio"))
    quota_text = _read(cpu_d / "cpu.cfs_quota_us") if cpu_d else None
    period_text = _read(cpu_d / "cpu.cfs_period_us") if cpu_d else None
    v1_quota = None
    if quota_text is not None and period_text:
        v1_quota = 0 if int(quota_text) < 0 else round(int(quota_text) * CPU_PERIOD_US / int(period_text))
    mem = _read(mem_d / "memory.limit_in_bytes") if mem_d else None
    weight = _read(blkio_d / "blkio.weight") if blkio_d else None
    return Held(
        v1_quota,
        None if mem is None else (0 if int(mem) >= UNLIMITED_V1 else int(mem)),
        None,
        int(weight) if weight and weight.isdigit() else None,
    )


class LimitsWriter(Protocol):
    """Sets a workload's limits one way or another (this module's cgroupfs writes, or systemd)."""

    def write(self, want: Limits) -> dict[str, str]:
        """Try every limit, each whatever became of the others. Every setting tried -> "" if set, else why
        not, with the fix."""
        ...


def missing_controller(layout: CgroupLayout, d: Path, controller: str) -> str | None:
    """Why `controller`'s files are not in v2 directory `d`, with the fix; None if nothing is missing."""
    if not d.is_dir():
        return (
            f"cgroup {d} does not exist: start the workload, or let the agent create it "
            "(capture.create_cgroups = true)"
        )
    root = layout.unified
    assert root is not None
    if controller not in (_read(root / "cgroup.controllers") or "").split():
        return f"this kernel has no {controller} controller in cgroup v2 ({root}/cgroup.controllers)"
    parent = d.parent
    if controller not in (_read(parent / "cgroup.subtree_control") or "").split():
        return (
            f"{controller} controller not enabled for {parent}: echo +{controller} > "
            f"{parent}/cgroup.subtree_control (and in each parent that lacks it), or name the workload by "
            'its systemd unit (unit = "..." instead of cgroup) so that systemd enables it'
        )
    return None


class CgroupfsWriter:
    """Writes the cgroup files itself: hosts without systemd, and subtrees delegated to the agent."""

    def __init__(self, layout: CgroupLayout, cgroup: str) -> None:
        self.layout, self.cgroup = layout, cgroup

    def write(self, want: Limits) -> dict[str, str]:
        if self.layout.mode == "v2":
            d = self.layout.v2_dir(self.cgroup)
            assert d is not None
            files = [
                ("cpu", d / "cpu.max", f"{want.cpu_quota_us or 'max'} {CPU_PERIOD_US}"),
                ("memory", d / "memory.max", str(want.memory_max or "max")),
                ("memory", d / "memory.high", str(want.memory_high or "max")),
            ]
            if want.io_weight:
                files.append(("io", d / "io.weight", f"default {want.io_weight}"))
            return {path.name: self._write_v2(controller, path, value) for controller, path, value in files}
        return self._write_v1(want)

    def _write_v2(self, controller: str, path: Path, value: str) -> str:
        if not path.exists():
            if value.startswith("max"):
                return ""  # no limit needs no controller
            why = missing_controller(self.layout, path.parent, controller)
            if why is not None:
                return why
            if path.name == "io.weight":
                log.info("%s: this kernel has no io.weight (no weight-based I/O control): left out", path)
                return ""
        try:
            path.write_text(value)
        except OSError as e:
            return missing_controller(self.layout, path.parent, controller) or (
                f"cannot write {value!r} to {path}: {e.strerror}"
            )
        return ""

    def _write_v1(self, want: Limits) -> dict[str, str]:
        cpu, mem, blkio = (self.layout.controller_dir(c, self.cgroup) for c in ("cpu", "memory", "blkio"))
        files: list[tuple[str, Path | None, str]] = [
            ("cpu", cpu and cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu", cpu and cpu / "cpu.cfs_quota_us", str(want.cpu_quota_us or -1)),
            ("memory", mem and mem / "memory.limit_in_bytes", str(want.memory_max or -1)),
        ]
        if want.io_weight and blkio is not None and (blkio / "blkio.weight").exists():
            files.append(("blkio", blkio / "blkio.weight", str(max(10, min(1000, want.io_weight)))))
        out = {}
        for controller, path, value in files:
            if path is None:
                out[f"{controller} limits"] = (
                    f"this host has no v1 {controller} controller mounted under {self.layout.root}"
                )
                continue
            try:
                path.write_text(value)
                out[path.name] = ""
            except FileNotFoundError:
                out[path.name] = (
                    f"{path.parent} does not exist: start the workload, or let the agent create it "
                    "(capture.create_cgroups = true)"
                )
            except OSError as e:
                out[path.name] = f"cannot write {value!r} to {path}: {e.strerror}"
        return out


def limits_applied(layout: CgroupLayout, cgroup: str, workload: str) -> apb.LimitsApplied:
    r = read_cgroup(layout, cgroup)
    held = read_held(layout, cgroup)
    return apb.LimitsApplied(
        workload=workload,
        cpu_cores=r.cpu_limit_cores,
        memory_bytes=r.memory_limit_bytes if r.memory_limit_bytes < UNLIMITED_V1 else 0,
        io_weight=held.io_weight or 0,
        memory_in_use_bytes=r.memory_bytes or 0,
    )


def outcome(tried: dict[str, str]) -> str:
    """Every limit's outcome, for an error: why each failed one failed, and that the others were set (one
    reason said once for all the limits it stopped)."""
    by_why: dict[str, list[str]] = {}
    for name, why in tried.items():
        by_why.setdefault(why or "set", []).append(name)
    return "; ".join(f"{', '.join(names)}: {why}" for why, names in by_why.items())


class WorkloadLimits:
    """One workload's limits: the last the controller asked for, kept in the kernel.

    `apply` runs in a worker thread (a command), `check` in the sampler thread: one lock orders them."""

    def __init__(self, name: str, layout: CgroupLayout, cgroup: str, writer: LimitsWriter) -> None:
        self.name, self.layout, self.cgroup, self.writer = name, layout, cgroup, writer
        self.asked: apb.SetLimits | None = None
        self.want: Limits | None = None
        self.problem = ""  # non-empty: the kernel does not hold `want`, and why
        self.reapplied = 0  # times `check` found the limits reset and wrote them again
        self._lock = threading.Lock()

    def apply(self, s: apb.SetLimits) -> apb.LimitsApplied:
        with self._lock:
            self.asked = s
            self.problem = self._write()
            if self.problem:
                raise LimitsError(self.problem)
            return limits_applied(self.layout, self.cgroup, self.name)

    def _write(self) -> str:
        """Plan from the last request and the memory in use now, write, read back: what is wrong, or ""."""
        assert self.asked is not None
        in_use = read_cgroup(self.layout, self.cgroup).memory_bytes or 0
        self.want = plan(self.asked, in_use)
        tried = self.writer.write(self.want)
        if any(tried.values()):
            return outcome(tried)
        off = mismatches(self.want, read_held(self.layout, self.cgroup))
        if off and not self.layout.exists(self.cgroup):
            # systemd keeps a stopped unit's limits and gives them to its cgroup when it starts
            return f"set, but cgroup {self.cgroup} does not exist (is the workload running?): " + ", ".join(
                off
            )
        if off:
            return "set, but the kernel does not hold them: " + ", ".join(off)
        return ""

    def check(self) -> None:
        """Re-read the kernel's limits; write again whatever was reset; say so (once per change)."""
        with self._lock:
            if self.want is None:
                return
            off = mismatches(self.want, read_held(self.layout, self.cgroup))
            if not off:
                if self.problem:
                    log.info("workload %s: the kernel holds its limits again", self.name)
                self.problem = ""
                return
            was = self.problem
            problem = self._write()
            if problem:
                self.problem = f"the kernel does not hold the limits ({', '.join(off)}): {problem}"
                if not was:
                    log.error("workload %s: %s", self.name, self.problem)
                return
            self.reapplied += 1
            log.warning(
                "workload %s: the kernel no longer held its limits (%s; reset e.g. by `systemctl "
                "daemon-reload`): applied them again (%d times so far)",
                self.name,
                ", ".join(off),
                self.reapplied,
            )
