"""The capture program's life in the agent: build it in a child, hold its descriptors, read its counters.

`unavailable_reason()` says, in one sentence an operator can act on, why BPF capture cannot run here; the
agent then runs on cgroup files alone.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agentd.capture import cgroup_filter
from agentd.capture.bpf_syscall import BpfMap, possible_cpus, raw_tracepoint_open, recursion_misses
from agentd.capture.kernel_counters import BlockCounters, KernelCounters, SyscallCounters, TcpCounters
from agentd.capture.kernel_features import TRACEFS, FeatureStatus, KernelView, compile_flags, decide
from agentd.capture.map_layout import LayoutError, MapLayout

log = logging.getLogger(__name__)

# The fields the agent reads from each counter map's value struct (bpf_program.c), checked at load.
READS = {
    "sys_stats": ("count", "lat_ns"),
    "io_stats": (
        "read_ops",
        "write_ops",
        "read_bytes",
        "write_bytes",
        "discard_ops",
        "discard_bytes",
        "lat_us",
    ),
    "tcp_stats": ("state", "srtt_us", "retransmits", "resets_sent", "resets_received"),
}


SYS_EXIT = "sys_exit"  # the raw tracepoint (and bcc's name for its attachment) timed in windows only
PROGRAM_SYS_EXIT = "raw_tracepoint__sys_exit"


class BpfLoadError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why BPF capture cannot run on this host (with the fix), or None when it can."""
    if os.geteuid() != 0:
        return (
            "not running as root: BPF capture needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE); "
            "run the agent as root or through its systemd unit"
        )
    if importlib.util.find_spec("bcc") is None:
        return (
            "the bcc Python module is not importable: apt-get install python3-bpfcc and run from a "
            "venv that links Debian's bcc (make setup builds one)"
        )
    if not (TRACEFS / "events").is_dir():
        return f"tracefs is not mounted at {TRACEFS}: mount -t tracefs tracefs {TRACEFS}"
    kdir = Path("/lib/modules") / platform.release()
    if not (kdir / "build" / "include").exists() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        return (
            f"no kernel headers for {platform.release()} at {kdir}/build: "
            "apt-get install linux-headers-amd64 "
            "and link it there (scripts/setup-host.sh does both)"
        )
    if not Path("/sys/fs/cgroup/unified").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return (
            "no cgroup v2 hierarchy: BPF attributes events by cgroup v2 id; boot with the unified or hybrid "
            "cgroup layout (systemd's default)"
        )
    return None


def program_cflags(
    max_slots: int, sample_every: int, features: tuple[FeatureStatus, ...], kernel: KernelView | None = None
) -> list[str]:
    """Compile-time settings: sizes, and one flag per feature this kernel's tracepoints allow."""
    kernel = kernel or KernelView(TRACEFS)
    headers = Path("/lib/modules") / platform.release() / "source"
    return [
        f"-DMAX_SLOTS={max_slots}",
        f"-DSAMPLE_EVERY={sample_every}",
        *cgroup_filter.cflags(),
        *compile_flags(kernel, features, headers),
    ]


@dataclass(frozen=True)
class SlotAssignment:
    workload: str
    slot: int
    cgroup_ids: tuple[int, ...]


def _u64(v: int) -> bytes:
    return int(v).to_bytes(8, "little")


def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


class Builder:
    """The child that compiles and attaches the program (agentd/capture/bpf_build.py), started at once and
    given its options later: the agent starts it before it drops the capabilities only attaching needs, so
    the child keeps them and the daemon does not (agentd/capabilities.py)."""

    # bcc compiles for seconds on a server, over a minute on a small or emulated one
    TIMEOUT_S = 300

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd.capture.bpf_build", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent

    def build(self, cflags: list[str]) -> tuple[bytes, list[int], bytes, int]:
        """Its reply, the descriptors it handed over, its stderr and its exit status."""
        with self.sock:
            self.sock.sendall(json.dumps({"cflags": cflags}).encode() + b"\n")
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 1024)
            _, stderr = self.proc.communicate(timeout=self.TIMEOUT_S)
        return msg, fds, stderr, int(self.proc.returncode)

    def close(self) -> None:
        """Not needed after all: the child reads end of file and exits."""
        self.sock.close()
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class BpfCapture:
    """The loaded capture program. Not thread-safe: one reader, the agent's loop."""

    def __init__(
        self,
        max_slots: int = 64,
        syscall_latency_sample_every: int = 8,
        kernel: KernelView | None = None,
        builder: Builder | None = None,
    ) -> None:
        kernel = kernel or KernelView(TRACEFS)
        # What this kernel lets the program capture: decides the program's flags and what the agent reports.
        self.features = decide(kernel)
        self.max_slots = max_slots
        self.sample_every = syscall_latency_sample_every
        self._ncpu = possible_cpus()
        self._maps: dict[str, BpfMap] = {}
        self._layouts: dict[str, MapLayout] = {}
        self._programs: dict[str, int] = {}
        self._attachments: dict[str, int] = {}
        self._assignments: dict[str, SlotAssignment] = {}
        self._filter: dict[int, tuple[int, int]] = {}  # entry index -> (cgroup id, slot) as written
        self._unplaced = 0  # cgroups of captured workloads that find no room in the filter now
        self._refused: set[int] = set()  # every cgroup id the filter had no room for, since load
        # latency timing windows: sys_exit attached only while one is open
        self._timing_lock = threading.Lock()
        self._window = 0
        self._window_opened: float | None = None
        self._timed_ns = 0
        self.syscall_names: dict[int, str] = {}
        self._load(program_cflags(max_slots, syscall_latency_sample_every, self.features, kernel), builder)

    def _load(self, cflags: list[str], builder: Builder | None) -> None:
        msg, fds, stderr, returncode = (builder or Builder()).build(cflags)
        reply: dict[str, Any] = json.loads(msg.decode() or "{}")
        if returncode != 0 or "error" in reply:
            for fd in fds:
                os.close(fd)
            detail = reply.get("error") or "no reply"
            compiler = stderr.decode(errors="replace").strip().splitlines()[-8:]
            raise BpfLoadError(f"building the capture program failed: {detail}\n" + "\n".join(compiler))
        it = iter(fds)
        for m in reply["maps"]:
            layout = MapLayout.from_manifest(m)
            self._layouts[layout.name] = layout
            self._maps[layout.name] = BpfMap(
                layout.name, next(it), layout.key_size, layout.value_size, layout.percpu
            )
        for name in reply["programs"]:
            self._programs[name] = next(it)
        self._attachments = dict(zip(reply["attachments"], it, strict=True))
        # Latency is timed in windows (time_latency): between them sys_exit stays detached, and every
        # syscall on the host is spared its cost.
        if SYS_EXIT in self._attachments:
            os.close(self._attachments.pop(SYS_EXIT))
        self.syscall_names = {int(k): v for k, v in reply.get("syscalls", {}).items()}
        if reply.get("cgroup_test_slow"):
            log.warning(
                "BPF capture: cgroup test through bpf_get_current_cgroup_id(), slower: %s",
                reply["cgroup_test_slow"],
            )
        try:
            for name, fields in READS.items():
                self._layouts[name].require(fields)
        except LayoutError as e:
            self.close()
            raise BpfLoadError(f"the capture program and the agent disagree: {e}") from None

    def histogram_buckets(self) -> dict[str, int]:
        """How many log2 buckets each kernel histogram has (Prometheus needs a histogram's buckets stable)."""
        return {
            "syscall_latency": self._layouts["sys_stats"].field("lat_ns").count,
            "block_io_latency": self._layouts["io_stats"].field("lat_us").count,
            "tcp_srtt": self._layouts["tcp_stats"].field("srtt_us").count,
        }

    # ---- workload -> slot mapping ----

    def assign(self, workloads: dict[str, tuple[int, ...]]) -> dict[str, SlotAssignment]:
        """Map each workload to a slot and its cgroup ids (the workload's v2 directory and descendants).

        A workload keeps its slot while it exists, so its cumulative counters stay continuous; a freed slot is
        zeroed before reuse.
        """
        if len(workloads) > self.max_slots:
            raise ValueError(
                f"{len(workloads)} workloads but capture.max_workloads is {self.max_slots}: raise it"
            )
        kept = {n: a for n, a in self._assignments.items() if n in workloads}
        used = {a.slot for a in kept.values()}
        free = (s for s in range(self.max_slots) if s not in used)
        result: dict[str, SlotAssignment] = {}
        for name, ids in workloads.items():
            if name in kept:
                slot = kept[name].slot
            else:
                slot = next(free)
                self._zero_slot(slot)
            result[name] = SlotAssignment(name, slot, ids)
        if result != self._assignments:
            self._write_cgroup_map(result)
        self._assignments = result
        return result

    def _zero_slot(self, slot: int) -> None:
        for name in ("sys_stats", "io_stats", "tcp_stats"):
            m = self._maps[name]
            m.update(_u32(slot), b"")

    def _write_cgroup_map(self, assignments: dict[str, SlotAssignment]) -> None:
        want = {cg: a.slot for a in assignments.values() for cg in a.cgroup_ids}
        placed, unplaced = cgroup_filter.layout(want, {idx: cg for idx, (cg, _) in self._filter.items()})
        self._refused.update(unplaced)
        if len(unplaced) != self._unplaced:
            if unplaced:
                log.error(
                    "%d cgroups of the captured workloads find no room in the capture's cgroup filter "
                    "(at most %d cgroups): their events are not counted (dropped_events "
                    "cgroups_not_captured); capture fewer cgroup trees",
                    len(unplaced),
                    cgroup_filter.MAX_CGROUPS,
                )
            self._unplaced = len(unplaced)
        target = {idx: (cg, want[cg]) for idx, cg in placed.items()}
        table, layout = self._maps["cgroup_filter"], self._layouts["cgroup_filter"]
        # New and changed entries first, emptied ones last: a task that stays captured is never out of it.
        for idx, (cg, slot) in target.items():
            if self._filter.get(idx) != (cg, slot):
                table.update(_u32(idx), layout.encode({"cgid": cg, "slot": slot}))
        for idx in self._filter.keys() - target.keys():
            table.update(_u32(idx), layout.encode({}))
        self._filter = target

    # ---- latency timing windows ----

    def time_latency(self, on: bool) -> None:
        """Open (attach sys_exit, then number the window) or close (unnumber, then detach) a timing window.
        Called from a worker thread: attaching and detaching a tracepoint can take milliseconds."""
        with self._timing_lock:
            if on == (self._window_opened is not None) or PROGRAM_SYS_EXIT not in self._programs:
                return
            windows = self._maps["timing_window"]
            if on:
                self._attachments[SYS_EXIT] = raw_tracepoint_open(self._programs[PROGRAM_SYS_EXIT], SYS_EXIT)
                self._window = self._window % 0xFFFFFFFF + 1
                windows.update(_u32(0), _u32(self._window))
                self._window_opened = time.monotonic()
            else:
                windows.update(_u32(0), _u32(0))
                os.close(self._attachments.pop(SYS_EXIT))
                assert self._window_opened is not None
                self._timed_ns += int((time.monotonic() - self._window_opened) * 1e9)
                self._window_opened = None

    def latency_timed_ns(self) -> int:
        """Nanoseconds since load during which syscall latency was timed (windows open)."""
        with self._timing_lock:
            open_ns = (
                int((time.monotonic() - self._window_opened) * 1e9) if self._window_opened is not None else 0
            )
            return self._timed_ns + open_ns

    # ---- reading ----

    def _slot(self, name: str, slot: int) -> dict[str, np.ndarray[Any, np.dtype[np.uint64]]]:
        """One slot's value of a per-CPU counter map, summed over CPUs, by field name."""
        raw = self._maps[name].lookup(_u32(slot))
        if raw is None:
            raise BpfLoadError(f"map {name} has no slot {slot}")
        return self._layouts[name].totals(raw, self._ncpu)

    def read(self, slot: int) -> KernelCounters:
        """Cumulative counters of one slot, summed over CPUs."""
        sys_ = self._slot("sys_stats", slot)
        io = self._slot("io_stats", slot)
        tcp = self._slot("tcp_stats", slot)
        return KernelCounters(
            syscalls=SyscallCounters(
                by_nr=sys_["count"].tolist(),
                latency_ns=sys_["lat_ns"].tolist(),
                timed_ns=self.latency_timed_ns(),
            ),
            block=BlockCounters(
                read_ops=int(io["read_ops"][0]),
                write_ops=int(io["write_ops"][0]),
                read_bytes=int(io["read_bytes"][0]),
                write_bytes=int(io["write_bytes"][0]),
                discard_ops=int(io["discard_ops"][0]),
                discard_bytes=int(io["discard_bytes"][0]),
                latency_us=io["lat_us"].tolist(),
            ),
            tcp=TcpCounters(
                state=tcp["state"].tolist(),
                srtt_us=tcp["srtt_us"].tolist(),
                retransmits=int(tcp["retransmits"][0]),
                resets_sent=int(tcp["resets_sent"][0]),
                resets_received=int(tcp["resets_received"][0]),
            ),
        )

    def dropped_events(self) -> dict[str, int]:
        """Cumulative count of events the capture could not account, by reason."""
        raw = self._maps["misses"].lookup(_u32(0))
        layout = self._layouts["misses"]
        totals = layout.totals(raw, self._ncpu) if raw else {}
        out: dict[str, int] = {f.name: int(totals[f.name][0]) if totals else 0 for f in layout.fields}
        # cumulative like the rest: cgroups the filter had no room for since load (their events not counted)
        out["cgroups_not_captured"] = len(self._refused)
        for name, fd in self._programs.items():
            n = recursion_misses(fd)
            if n:
                out[f"program_skipped:{name}"] = n
        return out

    def close(self) -> None:
        """Detach everything: closing the last descriptor of an attachment detaches it."""
        self.time_latency(False)
        for fd in self._attachments.values():
            os.close(fd)
        for fd in self._programs.values():
            os.close(fd)
        for m in self._maps.values():
            m.close()
        self._attachments, self._programs, self._maps, self._layouts = {}, {}, {}, {}
