"""Reading cgroup files on a fake cgroup v2 tree (this machine's v2 has no controllers) and on v1 files."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.cgroupfs import CgroupError, CgroupLayout, parse_cpu_max, parse_pressure, read_cgroup

PSI = "some avg10=1.50 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=99\n"


def fake_v2(root: Path, path: str) -> Path:
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "cgroup.procs").write_text("")
    d = root / path.strip("/")
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("10\n11\n")
    (d / "cpu.stat").write_text(
        "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nthrottled_usec 7\n"
    )
    (d / "cpu.max").write_text("150000 100000\n")
    (d / "memory.current").write_text("104857600\n")
    (d / "memory.max").write_text("max\n")
    (d / "io.stat").write_text(
        "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2\n8:16 rbytes=1 wbytes=2 rios=1 wios=1\n"
    )
    for res in ("cpu", "memory", "io"):
        (d / f"{res}.pressure").write_text(PSI)
    return d


def test_v2_layout_and_reading(tmp_path: Path) -> None:
    fake_v2(tmp_path, "/svc/web")
    layout = CgroupLayout.detect(tmp_path)
    assert layout.mode == "v2"
    r = read_cgroup(layout, "/svc/web")
    assert r.cpu_usage_ns == 2_500_000_000
    assert r.cpu_limit_cores == 1.5
    assert r.cpu_throttled_us == 7
    assert r.memory_bytes == 100 * 2**20 and r.memory_limit_bytes == 0
    assert (r.io_read_bytes, r.io_write_bytes) == (4097, 8194)
    assert r.tasks == 2
    assert r.pressure["memory"].some_avg10 == 1.5 and r.pressure["io"].full_total_us == 99


def test_hybrid_layout_reads_v1_controllers_and_v2_pressure(tmp_path: Path) -> None:
    for c in ("cpu", "cpuacct", "memory", "blkio", "unified"):
        (tmp_path / c / "w").mkdir(parents=True)
        (tmp_path / c / "cgroup.procs").write_text("")
    (tmp_path / "cpuacct/w/cpuacct.usage").write_text("3000000000\n")
    (tmp_path / "cpu/w/cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu/w/cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "memory/w/memory.usage_in_bytes").write_text("4096\n")
    (tmp_path / "memory/w/memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "blkio/w/blkio.throttle.io_service_bytes_recursive").write_text(
        "254:0 Read 100\n254:0 Write 200\n254:0 Total 300\nTotal 300\n"
    )
    (tmp_path / "unified/w/cgroup.procs").write_text("5\n")
    (tmp_path / "unified/w/cpu.pressure").write_text(PSI)
    layout = CgroupLayout.detect(tmp_path)
    assert layout.mode == "hybrid"
    assert {d.parent.name for d in layout.dirs("/w")} == {"unified", "cpu", "cpuacct", "memory", "blkio"}
    r = read_cgroup(layout, "/w")
    assert r.cpu_usage_ns == 3_000_000_000
    assert r.cpu_limit_cores == 0.5
    assert r.memory_bytes == 4096 and r.memory_limit_bytes == 0  # the v1 "unlimited" value
    assert (r.io_read_bytes, r.io_write_bytes) == (100, 200)
    assert r.tasks == 1 and r.pressure["cpu"].some_total_us == 1234


def test_cgroup_ids_cover_descendants(tmp_path: Path) -> None:
    d = fake_v2(tmp_path, "/svc")
    (d / "a" / "b").mkdir(parents=True)
    layout = CgroupLayout.detect(tmp_path)
    ids = layout.cgroup_ids("/svc")
    assert len(ids) == 3 and ids[0] == d.stat().st_ino


def test_paths_must_stay_inside_the_hierarchy(tmp_path: Path) -> None:
    fake_v2(tmp_path, "/svc")
    with pytest.raises(CgroupError, match=r"'\.\.'"):
        CgroupLayout.detect(tmp_path).v2_dir("/svc/../../etc")


def test_no_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no cgroup hierarchy"):
        CgroupLayout.detect(tmp_path)


def test_parsers() -> None:
    assert parse_cpu_max("max 100000") == 0.0
    assert parse_cpu_max("25000 50000\n") == 0.5
    p = parse_pressure(PSI)
    assert p is not None and p.full_avg10 == 0.25
    assert parse_pressure("") is None
