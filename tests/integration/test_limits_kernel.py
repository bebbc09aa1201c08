"""Limits written into the real kernel's cgroup files (this machine: v1 cpu/memory, hybrid), read back, reset
behind the agent's back as a `systemctl daemon-reload` resets a unit's directly written limits, and written
again at the next sample, which says so. The systemd path (pure v2) is tested in the VM suite (tests/vm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.actuate.limits import CgroupfsWriter, LimitsError, WorkloadLimits
from agentd.config import AgentConfig, CaptureConfig, WorkloadConfig
from agentd.daemon import Agent
from controller.scaling.decision import AppliedLimits, held
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from tests.support import Workload, need

MIB = 1 << 20


def files(w: Workload) -> tuple[Path, Path]:
    """The cgroup files that hold the workload's CPU quota and memory limit on this host."""
    if w.layout.mode == "v2":
        d = w.layout.v2_dir(w.path)
        assert d is not None
        return d / "cpu.max", d / "memory.max"
    cpu, mem = w.layout.controller_dir("cpu", w.path), w.layout.controller_dir("memory", w.path)
    assert cpu is not None and mem is not None
    return cpu / "cpu.cfs_quota_us", mem / "memory.limit_in_bytes"


def need_limit_files(w: Workload) -> None:
    cpu, mem = files(w)
    need(
        cpu.exists() and mem.exists(),
        f"no {cpu.name} / {mem.name} for a new cgroup here (cpu and memory controllers off)",
        "mount the v1 cpu and memory controllers, or enable +cpu +memory in the v2 root's subtree_control",
    )


def reset(w: Workload) -> None:
    """What a daemon-reload does to limits systemd did not set: back to unlimited."""
    cpu, mem = files(w)
    cpu.write_text("max 100000" if w.layout.mode == "v2" else "-1")
    mem.write_text("max" if w.layout.mode == "v2" else "-1")


def test_limits_are_read_back_and_written_again_when_reset(workload_cgroup: Workload) -> None:
    need_limit_files(workload_cgroup)
    cfg = AgentConfig(
        host="t",
        tls=TlsConfig(plaintext=True),
        capture=CaptureConfig(bpf=False, create_cgroups=False),
        workload=[WorkloadConfig(name="t", role="shadow", service="t", cgroup=workload_cgroup.path)],
    )
    agent = Agent(cfg)
    limits = agent.limits["t"]
    got = limits.apply(apb.SetLimits(workload="t", cpu_cores=0.5, memory_bytes=256 * MIB))
    assert (got.cpu_cores, got.memory_bytes) == (0.5, 256 * MIB)  # what the kernel says, not what was asked
    applied = AppliedLimits(got.cpu_cores, got.memory_bytes, at_ms=0)

    (first,) = agent.collect(1).samples
    assert (first.resources.limits_problem, first.resources.limits_reapplied) == ("", 0)
    assert held(applied, first).ready

    reset(workload_cgroup)
    (second,) = agent.collect(2).samples
    # the sample is read after the agent wrote them again: the kernel holds them, and the sample says it
    # had to
    assert second.resources.limits_reapplied == 1 and second.resources.limits_problem == ""
    assert (second.resources.cpu_limit_cores, second.resources.memory_limit_bytes) == (0.5, 256 * MIB)
    assert held(applied, second).ready
    cpu, mem = files(workload_cgroup)
    assert int(mem.read_text()) == 256 * MIB
    assert cpu.read_text().split()[0] == "50000"  # v1 quota or v2 "quota period"


def test_a_limit_that_cannot_be_written_does_not_stop_the_others(workload_cgroup: Workload) -> None:
    need_limit_files(workload_cgroup)
    need(workload_cgroup.layout.mode != "v2", "needs v1 controllers (one can be taken away)", "a hybrid host")
    cpu, mem = files(workload_cgroup)
    cpu.parent.rmdir()  # the workload has no cpu cgroup: every cpu write fails
    limits = WorkloadLimits(
        "t",
        workload_cgroup.layout,
        workload_cgroup.path,
        CgroupfsWriter(workload_cgroup.layout, workload_cgroup.path),
    )
    with pytest.raises(LimitsError) as e:
        limits.apply(apb.SetLimits(workload="t", cpu_cores=0.5, memory_bytes=256 * MIB))
    assert f"cpu.cfs_quota_us: {cpu.parent} does not exist" in str(e.value)
    assert "memory.limit_in_bytes: set" in str(e.value)
    assert int(mem.read_text()) == 256 * MIB
