"""Where a workload's cgroup files are, on v2, v1 and hybrid hosts, and what they say.

A workload is named by one path (e.g. `/shadowplane.slice/web`) that is the same in every hierarchy, as
systemd lays services out. On a hybrid host (v1 cpu/memory controllers, the v2 hierarchy at
/sys/fs/cgroup/unified without controllers) limits live in v1 and BPF attribution uses the v2 directory's
id, so the agent keeps the workload's tasks in both.

Reading only here; writing limits lives in agentd.actuate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio")
UNLIMITED_V1 = 1 << 62  # memory.limit_in_bytes reads as ~2^63 rounded to pages when unlimited


class CgroupError(RuntimeError):
    pass


@dataclass(frozen=True)
class CgroupLayout:
    root: Path
    mode: Literal["v2", "hybrid", "v1"]
    unified: Path | None
    v1: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def detect(cls, root: Path = Path("/sys/fs/cgroup")) -> CgroupLayout:
        if (root / "cgroup.controllers").exists():
            return cls(root, "v2", root)
        v1 = {c: root / c for c in V1_CONTROLLERS if (root / c / "cgroup.procs").exists()}
        unified = root / "unified"
        if (unified / "cgroup.procs").exists():
            return cls(root, "hybrid", unified, v1)
        if not v1:
            raise CgroupError(
                f"no cgroup hierarchy under {root}: mount cgroup2 there (or the v1 controllers)"
            )
        return cls(root, "v1", None, v1)

    @staticmethod
    def _rel(path: str) -> str:
        rel = path.strip("/")
        if ".." in rel.split("/"):
            raise CgroupError(f"cgroup path {path!r} must not contain '..'")
        return rel

    def v2_dir(self, path: str) -> Path | None:
        return self.unified / self._rel(path) if self.unified else None

    def controller_dir(self, controller: str, path: str) -> Path | None:
        """Directory holding `controller`'s files for the workload, in whichever hierarchy has it."""
        if self.mode == "v2":
            assert self.unified is not None
            return self.unified / self._rel(path)
        base = self.v1.get(controller)
        return base / self._rel(path) if base else None

    def dirs(self, path: str) -> list[Path]:
        """Every directory that is this workload: the v2 one and each v1 controller's."""
        out: list[Path] = []
        v2 = self.v2_dir(path)
        if v2 is not None:
            out.append(v2)
        if self.mode != "v2":
            seen = set()
            for base in self.v1.values():
                real = base.resolve()
                if real not in seen:  # cpu and cpuacct are often one mount under two names
                    seen.add(real)
                    out.append(base / self._rel(path))
        return out

    def ensure(self, path: str) -> list[Path]:
        """Create the workload's directories that are missing; return the ones created."""
        created = []
        for d in self.dirs(path):
            if not d.is_dir():
                d.mkdir(parents=True)
                created.append(d)
        return created

    def add_pid(self, path: str, pid: int) -> None:
        for d in self.dirs(path):
            (d / "cgroup.procs").write_text(f"{pid}\n")

    def cgroup_ids(self, path: str) -> tuple[int, ...]:
        """cgroup v2 ids (directory inodes) of the workload and its descendants: what BPF sees."""
        top = self.v2_dir(path)
        if top is None or not top.is_dir():
            return ()
        ids = [top.stat().st_ino]
        for dirpath, dirnames, _ in os.walk(top):
            for d in dirnames:
                ids.append(os.stat(os.path.join(dirpath, d)).st_ino)
        return tuple(ids)

    def exists(self, path: str) -> bool:
        return all(d.is_dir() for d in self.dirs(path))

    def remove(self, path: str) -> None:
        """Remove the workload's (empty) directories, deepest first."""
        for d in self.dirs(path):
            if d.is_dir():
                for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    sub.rmdir()
                d.rmdir()


@dataclass
class PressureReading:
    some_avg10: float = 0.0
    full_avg10: float = 0.0
    some_total_us: int = 0
    full_total_us: int = 0


@dataclass
class CgroupReading:
    """What the cgroup files say now. Counters are cumulative; None where this host has no such file."""

    cpu_usage_ns: int | None = None
    cpu_throttled_us: int | None = None
    cpu_limit_cores: float = 0.0  # 0 = unlimited
    memory_bytes: int | None = None
    memory_limit_bytes: int = 0  # 0 = unlimited
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    tasks: int = 0
    pressure: dict[str, PressureReading] = field(default_factory=dict)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def parse_pressure(text: str | None) -> PressureReading | None:
    if not text:
        return None
    r = PressureReading()
    for line in text.splitlines():
        kind, *pairs = line.split()
        vals = dict(p.split("=", 1) for p in pairs)
        if kind == "some":
            r.some_avg10, r.some_total_us = float(vals["avg10"]), int(vals["total"])
        elif kind == "full":
            r.full_avg10, r.full_total_us = float(vals["avg10"]), int(vals["total"])
    return r


def parse_cpu_max(text: str) -> float:
    quota, _, period = text.strip().partition(" ")
    if quota == "max":
        return 0.0
    return int(quota) / int(period or "100000")


def parse_io_stat(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    rd = wr = 0
    for line in text.splitlines():
        for pair in line.split()[1:]:
            k, _, v = pair.partition("=")
            if k == "rbytes":
                rd += int(v)
            elif k == "wbytes":
                wr += int(v)
    return rd, wr


def parse_blkio_service_bytes(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    rd = wr = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            rd += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            wr += int(parts[2])
    return rd, wr


def read_cgroup(layout: CgroupLayout, path: str) -> CgroupReading:
    r = CgroupReading()
    v2 = layout.v2_dir(path)
    if layout.mode == "v2":
        assert v2 is not None
        stat = _kv(_read(v2 / "cpu.stat"))
        if "usage_usec" in stat:
            r.cpu_usage_ns = stat["usage_usec"] * 1000
        r.cpu_throttled_us = stat.get("throttled_usec")
        cpu_max = _read(v2 / "cpu.max")
        r.cpu_limit_cores = parse_cpu_max(cpu_max) if cpu_max else 0.0
        mem = _read(v2 / "memory.current")
        r.memory_bytes = int(mem) if mem else None
        mem_max = (_read(v2 / "memory.max") or "max").strip()
        r.memory_limit_bytes = 0 if mem_max == "max" else int(mem_max)
        io = parse_io_stat(_read(v2 / "io.stat"))
    else:
        cpuacct = layout.controller_dir("cpuacct", path)
        usage = _read(cpuacct / "cpuacct.usage") if cpuacct else None
        if usage:
            r.cpu_usage_ns = int(usage)
        elif v2 is not None:  # v2 accounts CPU time for every cgroup, controller or not
            stat = _kv(_read(v2 / "cpu.stat"))
            if "usage_usec" in stat:
                r.cpu_usage_ns = stat["usage_usec"] * 1000
        cpu = layout.controller_dir("cpu", path)
        if cpu:
            throttled = _kv(_read(cpu / "cpu.stat")).get("throttled_time")
            r.cpu_throttled_us = throttled // 1000 if throttled is not None else None
            quota, period = _read(cpu / "cpu.cfs_quota_us"), _read(cpu / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                r.cpu_limit_cores = int(quota) / int(period)
        memd = layout.controller_dir("memory", path)
        if memd:
            mem = _read(memd / "memory.usage_in_bytes")
            r.memory_bytes = int(mem) if mem else None
            lim = _read(memd / "memory.limit_in_bytes")
            r.memory_limit_bytes = int(lim) if lim and int(lim) < UNLIMITED_V1 else 0
        blkio = layout.controller_dir("blkio", path)
        io = (
            parse_blkio_service_bytes(_read(blkio / "blkio.throttle.io_service_bytes_recursive"))
            if blkio
            else None
        )
    if io is not None:
        r.io_read_bytes, r.io_write_bytes = io
    if v2 is not None:
        procs = _read(v2 / "cgroup.procs")
        r.tasks = len(procs.split()) if procs else 0
        for res in ("cpu", "memory", "io"):
            p = parse_pressure(_read(v2 / f"{res}.pressure"))
            if p is not None:
                r.pressure[res] = p
    else:
        cpu = layout.controller_dir("cpu", path)
        procs = _read(cpu / "cgroup.procs") if cpu else None
        r.tasks = len(procs.split()) if procs else 0
    return r
