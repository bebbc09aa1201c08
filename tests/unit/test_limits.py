"""Workload limits: what is planned from a SetLimits, how systemd is asked for it, what a missing controller
says, and when the kernel counts as holding them (agent side) or a shadow as ready (controller side).

The cgroup v2 trees here are files in a temporary directory: this machine's v2 hierarchy has no controllers
to enable. The real kernel is in tests/integration/test_limits_kernel.py (v1 here) and tests/vm (v2, systemd).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.actuate.limits import (
    PAGE_BYTES,
    CgroupfsWriter,
    Held,
    Limits,
    LimitsError,
    WorkloadLimits,
    mismatches,
    outcome,
    plan,
    read_held,
)
from agentd.cgroupfs import CgroupLayout
from agentd.config import WorkloadConfig
from agentd.systemd_units import (
    UINT64_MAX,
    DBusUnits,
    Property,
    SystemdError,
    SystemdWriter,
    UnitState,
    explain,
    prepare,
    slice_path,
    unit_cgroup,
    unit_properties,
)
from controller.scaling.decision import AppliedLimits, held
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

GIB = 1 << 30


def test_plan_rounds_to_what_both_backends_read_back() -> None:
    p = plan(apb.SetLimits(cpu_cores=1.234, memory_bytes=GIB + 1, io_weight=20_000), memory_in_use=0)
    assert p.cpu_quota_us == 123_000  # whole percent: systemd's CPUQuota= drop-in keeps no finer
    assert p.memory_max % PAGE_BYTES == 0 and GIB + 1 <= p.memory_max < GIB + 1 + PAGE_BYTES
    assert p.memory_high == -(-int(p.memory_max * 0.9) // PAGE_BYTES) * PAGE_BYTES
    assert p.io_weight == 10_000  # systemd's and the kernel's highest
    assert plan(apb.SetLimits(cpu_cores=0.001), 0).cpu_quota_us == 1000  # the kernel's smallest quota
    assert plan(apb.SetLimits(), 0) == Limits(0, 0, 0, 0)  # no limits at all


def test_plan_never_sets_memory_below_what_is_in_use() -> None:
    assert plan(apb.SetLimits(memory_bytes=GIB), memory_in_use=2 * GIB).memory_max == 2 * GIB
    with pytest.raises(LimitsError, match="negative"):
        plan(apb.SetLimits(cpu_cores=-1), 0)


def test_mismatches_name_each_limit_the_kernel_lost() -> None:
    want = Limits(150_000, GIB, GIB // 2, 100)
    assert mismatches(want, Held(150_000, GIB, GIB // 2, 100)) == ()
    # what a daemon-reload of a unit with direct writes leaves behind
    assert mismatches(want, Held(0, 0, 0, 100)) == (
        "cpu.max is max, want 150000",
        f"memory.max is max, want {GIB}",
        f"memory.high is max, want {GIB // 2}",
    )
    assert mismatches(want, Held(None, GIB, GIB // 2, 50)) == (
        "cpu.max is missing",
        "io.weight is 50, want 100",
    )
    # a host without io weights is told at apply time; the limits it can hold are held
    assert mismatches(want, Held(150_000, GIB, GIB // 2, None)) == ()


def test_unit_properties_are_systemds_names_and_types() -> None:
    props = dict(unit_properties(Limits(150_000, GIB, GIB // 2, 100)))
    assert props == {
        "CPUQuotaPerSecUSec": ("t", 1_500_000),  # 1.5 s of CPU per second = 150000/100000 in cpu.max
        "MemoryMax": ("t", GIB),
        "MemoryHigh": ("t", GIB // 2),
        "IOWeight": ("t", 100),
    }
    unlimited = dict(unit_properties(Limits(0, 0, 0, 0)))
    assert unlimited == {  # "infinity"; no IOWeight: 0 leaves it as it is
        "CPUQuotaPerSecUSec": ("t", UINT64_MAX),
        "MemoryMax": ("t", UINT64_MAX),
        "MemoryHigh": ("t", UINT64_MAX),
    }


def test_cgroup_paths_of_units() -> None:
    assert slice_path("web.slice") == "/web.slice"
    assert slice_path("shadowplane-web.slice") == "/shadowplane.slice/shadowplane-web.slice"
    assert slice_path("-.slice") == "/"
    running = UnitState("loaded", "active", "/system.slice/nginx.service", "system.slice")
    assert unit_cgroup("nginx.service", running) == "/system.slice/nginx.service"
    stopped = UnitState("loaded", "inactive", "", "shadowplane-web.slice")
    assert unit_cgroup("nginx.service", stopped) == "/shadowplane.slice/shadowplane-web.slice/nginx.service"
    assert unit_cgroup("web.slice", UnitState("not-found", "inactive", "", "")) == "/web.slice"
    with pytest.raises(SystemdError, match=r'not-found: install it .*\(unit = "nginx.slice"\).* Slice='):
        unit_cgroup("nginx.service", UnitState("not-found", "inactive", "", ""))


def test_systemd_errors_say_what_to_do() -> None:
    assert "must run as root" in explain(
        "org.freedesktop.DBus.Error.AccessDenied", "Access denied", "a.service"
    )
    assert "install the unit" in explain(
        "org.freedesktop.systemd1.NoSuchUnit", "Unit a.service not loaded.", ""
    )


class StandInSystemd:
    """Stands in for systemd (which cannot run on this machine: not PID 1): refuses properties it is told
    to, remembers what it was asked. The real one is asked in tests/vm."""

    def __init__(
        self, refuse: frozenset[str] = frozenset(), states: dict[str, UnitState] | None = None
    ) -> None:
        self.refuse, self.states = refuse, states or {}
        self.calls: list[tuple[str, str, list[Property]]] = []

    def state(self, unit: str) -> UnitState:
        return self.states.get(unit, UnitState("not-found", "inactive", "", ""))

    def set_properties(self, unit: str, properties: list[Property]) -> None:
        self.calls.append(("set", unit, properties))
        bad = [name for name, _ in properties if name in self.refuse]
        if bad:
            raise SystemdError(f"Cannot set property {bad[0]}, or unknown property.")

    def start_slice(self, unit: str, properties: list[Property]) -> None:
        self.calls.append(("start", unit, properties))
        self.states[unit] = UnitState("loaded", "active", slice_path(unit), "")


def test_a_refused_property_does_not_keep_the_others_from_being_set() -> None:
    systemd = StandInSystemd(refuse=frozenset({"IOWeight"}))
    out = SystemdWriter(systemd, "web.service").write(Limits(150_000, GIB, GIB // 2, 100))
    assert out == {
        "CPUQuotaPerSecUSec": "",
        "MemoryMax": "",
        "MemoryHigh": "",
        "IOWeight": "Cannot set property IOWeight, or unknown property.",
    }
    # all at once first (systemd applies a call all or nothing), then each alone
    assert [len(p) for _, _, p in systemd.calls] == [4, 1, 1, 1, 1]


def test_a_shadow_slice_is_started_ahead_of_demand_and_a_primary_is_left_alone() -> None:
    systemd = StandInSystemd()
    shadow = WorkloadConfig(name="web", role="shadow", service="web", unit="shadowplane-web.slice")
    assert prepare(systemd, shadow) == "/shadowplane.slice/shadowplane-web.slice"
    assert [(c[0], c[1]) for c in systemd.calls] == [("start", "shadowplane-web.slice")]
    primary = WorkloadConfig(name="db", role="primary", service="db", unit="db.slice")
    assert prepare(systemd, primary) == "/db.slice" and len(systemd.calls) == 1


def v2_tree(root: Path, enabled: str) -> Path:
    """A v2 hierarchy as a stock Debian 12 has it: system.slice enables only `enabled` for its children."""
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.procs").write_text("")
    parent = root / "system.slice"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text(enabled + "\n")
    d = parent / "web.service"
    d.mkdir()
    (d / "memory.current").write_text("4096\n")
    for name in ("memory.max", "memory.high"):
        (d / name).write_text("max\n")
    if "cpu" in enabled.split():
        (d / "cpu.max").write_text("max 100000\n")
    return d


def test_missing_cpu_controller_is_named_with_the_fix_and_memory_is_still_set(tmp_path: Path) -> None:
    d = v2_tree(tmp_path, "memory pids")
    layout = CgroupLayout.detect(tmp_path)
    limits = WorkloadLimits(
        "web", layout, "/system.slice/web.service", CgroupfsWriter(layout, "/system.slice/web.service")
    )
    with pytest.raises(LimitsError) as e:
        limits.apply(apb.SetLimits(workload="web", cpu_cores=1.5, memory_bytes=GIB))
    said = str(e.value)
    assert (
        f"cpu.max: cpu controller not enabled for {tmp_path}/system.slice: echo +cpu > "
        f"{tmp_path}/system.slice/cgroup.subtree_control"
    ) in said
    assert "or name the workload by its systemd unit" in said
    assert "memory.max, memory.high: set" in said
    assert "Permission denied" not in said
    assert (d / "memory.max").read_text() == str(GIB)
    want = plan(apb.SetLimits(cpu_cores=1.5, memory_bytes=GIB), memory_in_use=4096)
    assert read_held(layout, "/system.slice/web.service") == Held(
        None, want.memory_max, want.memory_high, None
    )
    assert limits.problem == said  # and each sample says so until the kernel holds them


def test_missing_cgroup_and_missing_kernel_controller(tmp_path: Path) -> None:
    v2_tree(tmp_path, "cpu memory pids")
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    layout = CgroupLayout.detect(tmp_path)
    out = CgroupfsWriter(layout, "/system.slice/web.service").write(Limits(150_000, GIB, GIB // 2, 100))
    assert out["io.weight"].startswith("this kernel has no io controller")
    assert out["cpu.max"] == out["memory.max"] == ""
    gone = CgroupfsWriter(layout, "/system.slice/gone.service").write(Limits(150_000, 0, 0, 0))
    assert gone["cpu.max"].startswith(f"cgroup {tmp_path}/system.slice/gone.service does not exist")


def applied(cpu: float, memory: int, at_ms: int = 1000) -> AppliedLimits:
    return AppliedLimits(cpu, memory, at_ms=at_ms)


def sample(end_ms: int, cpu: float, memory: int, problem: str = "") -> tpb.WorkloadSample:
    return tpb.WorkloadSample(
        end_unix_ms=end_ms,
        resources=tpb.Resources(cpu_limit_cores=cpu, memory_limit_bytes=memory, limits_problem=problem),
    )


def test_ready_only_while_the_newest_read_back_matches_what_was_applied() -> None:
    a = applied(1.5, GIB)
    assert held(a, None).ready
    assert held(a, sample(2000, 1.5, GIB)).ready
    # the kernel lost them (a daemon-reload of a unit with direct writes) and the agent could not write them
    lost = held(a, sample(2000, 0.0, 0))
    assert not lost.ready
    assert lost.reason == (
        f"the kernel no longer holds the applied limits: cpu 0 cores (applied 1.5), memory max bytes "
        f"(applied {GIB})"
    )
    said = held(a, sample(2000, 1.5, GIB, problem="cpu.max: cpu controller not enabled"))
    assert not said.ready and said.reason.endswith("cpu.max: cpu controller not enabled")
    # a sample read before the limits were applied says nothing about them
    assert held(a, sample(900, 0.0, 0)).ready


def test_no_limit_needs_no_controller(tmp_path: Path) -> None:
    v2_tree(tmp_path, "memory pids")  # no cpu.max: the cpu controller is off, as on a stock system.slice
    layout = CgroupLayout.detect(tmp_path)
    want = Limits(0, GIB, GIB // 2, 0)  # memory only
    out = CgroupfsWriter(layout, "/system.slice/web.service").write(want)
    assert out == {"cpu.max": "", "memory.max": "", "memory.high": ""}
    assert mismatches(want, read_held(layout, "/system.slice/web.service")) == ()


def test_a_unit_workload_without_systemd_says_what_to_do_instead() -> None:
    # a real connection attempt (jeepney) to a bus that is not there, as on a host without systemd
    units = DBusUnits("unix:path=/nonexistent/system_bus_socket")
    try:
        out = SystemdWriter(units, "nginx.service").write(Limits(150_000, GIB, GIB // 2, 0))
    finally:
        units.close()
    (why,) = set(out.values())
    assert why.startswith("cannot reach systemd on the D-Bus system bus")
    assert 'name the workload by its cgroup (cgroup = "/...") instead of `unit`' in why
    assert outcome(out).startswith("CPUQuotaPerSecUSec, MemoryMax, MemoryHigh: cannot reach systemd")
