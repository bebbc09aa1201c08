"""What the capture makes the host pay, observed in the kernel (root + BPF): sys_exit is attached only while a
latency timing window is open, processes outside captured workloads never get per-task state, and the cgroup
filter finds every cgroup of a workload's tree (its hash in C and in Python agree)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agentd.capture.bpf_capture import BpfCapture
from agentd.capture.bpf_syscall import program_id, raw_tracepoint_links
from tests.support import Workload, collector_for, need_bpf

DD = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1"]


@pytest.fixture(scope="module")
def capture() -> Iterator[BpfCapture]:
    need_bpf()
    c = BpfCapture(max_slots=4, syscall_latency_sample_every=8)
    try:
        yield c
    finally:
        c.close()


def ours_attached(capture: BpfCapture) -> set[str]:
    ids = {program_id(fd) for fd in capture._programs.values()}
    return {tp for tp, prog in raw_tracepoint_links() if prog in ids}


def test_sys_exit_is_attached_only_while_a_timing_window_is_open(
    capture: BpfCapture, workload_cgroup: Workload
) -> None:
    col = collector_for(capture, workload_cgroup)
    # loaded with no window open: counting needs sys_enter only
    assert ours_attached(capture) == {"sys_enter"}
    workload_cgroup.run([*DD, "count=50000"])
    (outside,) = col.collect()
    # counted exactly, but nothing timed: sys_exit never ran
    assert 50_000 <= outside.syscalls.by_name["read"] <= 51_000
    assert sum(outside.syscalls.latency.counts) == 0
    assert outside.syscalls.latency_timed_seconds == 0

    capture.time_latency(True)
    try:
        assert ours_attached(capture) == {"sys_enter", "sys_exit"}
        workload_cgroup.run([*DD, "count=50000"])
    finally:
        capture.time_latency(False)
    assert ours_attached(capture) == {"sys_enter"}
    (inside,) = col.collect()
    assert 50_000 <= inside.syscalls.by_name["read"] <= 51_000
    timed = sum(inside.syscalls.latency.counts)
    assert inside.syscalls.total / 8 * 0.9 <= timed <= inside.syscalls.total / 8 * 1.1
    assert 0 < inside.syscalls.latency_timed_seconds < 60


LOOP_THEN_WAIT = r"""
import os, sys
for _ in range(20000):
    os.getppid()
print("done", flush=True)
sys.stdin.read()
"""


def task_state_exists(capture: BpfCapture, pid: int) -> bool:
    """Does the task have BPF task storage? Looked up through a pidfd, as the kernel keys it."""
    pidfd = os.pidfd_open(pid)
    try:
        return capture._maps["task_state"].lookup(pidfd.to_bytes(4, "little")) is not None
    finally:
        os.close(pidfd)


def test_processes_outside_captured_workloads_get_no_task_storage(
    capture: BpfCapture, workload_cgroup: Workload
) -> None:
    collector_for(capture, workload_cgroup)
    capture.time_latency(True)  # the costliest state: sys_exit attached, calls being timed
    inside = workload_cgroup.popen(
        [sys.executable, "-c", LOOP_THEN_WAIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    outside = subprocess.Popen(
        [sys.executable, "-c", LOOP_THEN_WAIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        for p in (inside, outside):
            assert p.stdout is not None and p.stdout.readline() == b"done\n"
        assert task_state_exists(capture, inside.pid), "a captured task timed in the window has its state"
        assert not task_state_exists(capture, outside.pid), "an uncaptured task must cost no task storage"
    finally:
        capture.time_latency(False)
        for p in (inside, outside):
            p.kill()
            p.wait()
    assert capture.dropped_events()["task_storage_full"] == 0


def test_every_cgroup_of_a_deep_tree_is_captured(capture: BpfCapture, workload_cgroup: Workload) -> None:
    # 60 cgroups below the workload's: their ids are consecutive inode numbers, which the filter's hash must
    # spread, and which the C and Python sides must place and find alike
    children = [f"{workload_cgroup.path}/c{i}" for i in range(30)]
    children += [f"{workload_cgroup.path}/c0/d{i}" for i in range(30)]
    for c in children:
        workload_cgroup.layout.ensure(c)
    col = collector_for(capture, workload_cgroup)
    assert len(capture._filter) == 61
    for c in (children[7], children[29], children[45]):
        Workload(workload_cgroup.layout, c).run([*DD, "count=10000"])
    (s,) = col.collect()
    assert 30_000 <= s.syscalls.by_name["read"] <= 30_000 * 1.02


def test_cgroups_the_filter_has_no_room_for_are_reported(
    capture: BpfCapture, workload_cgroup: Workload, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the filter's limit made small: a workload of three cgroups, room for two (ids placed in id order, so
    # the child made last is the one refused)
    monkeypatch.setattr("agentd.capture.cgroup_filter.MAX_CGROUPS", 2)
    kids = [f"{workload_cgroup.path}/a", f"{workload_cgroup.path}/b"]
    for k in kids:
        workload_cgroup.layout.ensure(k)
    col = collector_for(capture, workload_cgroup)
    assert capture.dropped_events()["cgroups_not_captured"] == 1
    Workload(workload_cgroup.layout, kids[0]).run([*DD, "count=10000"])
    Workload(workload_cgroup.layout, kids[1]).run([*DD, "count=10000"])
    (s,) = col.collect()
    assert 10_000 <= s.syscalls.by_name["read"] <= 10_200, "the placed child counted, the refused one not"
