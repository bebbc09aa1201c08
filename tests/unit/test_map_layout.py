"""BPF map values are decoded by field name from the layout of the C struct (here a ctypes struct built the
way bcc builds one from bpf_program.c; tests/capture reads the real program's maps)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from agentd.capture.map_layout import Field, LayoutError, MapLayout, describe_ctype


class IoSlot(ctypes.Structure):
    _fields_ = [
        ("read_ops", ctypes.c_ulonglong),
        ("flags", ctypes.c_uint),
        ("lat_us", ctypes.c_ulonglong * 4),
    ]


def test_the_struct_is_the_layout() -> None:
    fields = describe_ctype(IoSlot)
    # u32 then u64 array: the compiler's alignment puts the array at 16, not 12
    assert fields == (Field("read_ops", 0, 8, 1), Field("flags", 8, 4, 1), Field("lat_us", 16, 8, 4))
    assert describe_ctype(ctypes.c_uint) == (Field("", 0, 4, 1),)


def test_per_cpu_values_are_summed_by_field() -> None:
    layout = MapLayout("io_stats", 4, ctypes.sizeof(IoSlot), True, describe_ctype(IoSlot))
    cpus = [
        IoSlot(3, 1, (ctypes.c_ulonglong * 4)(1, 2, 3, 4)),
        IoSlot(4, 2, (ctypes.c_ulonglong * 4)(0, 0, 0, 2**40)),
    ]
    raw = b"".join(bytes(c).ljust(layout.stride, b"\0") for c in cpus)
    t = layout.totals(raw, ncpu=2)
    assert int(t["read_ops"][0]) == 7 and int(t["flags"][0]) == 3
    assert t["lat_us"].tolist() == [1, 2, 3, 4 + 2**40] and t["lat_us"].dtype == np.uint64
    with pytest.raises(LayoutError, match="value of 8 bytes"):
        layout.totals(raw[:8], ncpu=2)


def test_a_field_the_agent_reads_but_the_program_lacks_is_named() -> None:
    layout = MapLayout("io_stats", 4, ctypes.sizeof(IoSlot), True, describe_ctype(IoSlot))
    layout.require(["read_ops", "lat_us"])
    with pytest.raises(LayoutError, match=r"map io_stats has no field 'write_ops' \(bpf_program.c defines: "):
        layout.require(["read_ops", "write_ops"])
    assert MapLayout.from_manifest(layout.to_manifest()) == layout
