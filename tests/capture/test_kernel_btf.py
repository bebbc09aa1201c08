"""Struct offsets from the running kernel's BTF (agentd/capture/kernel_btf.py): the cgroup test's walk."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.capture.kernel_btf import CGROUP_ID_WALK, VMLINUX_BTF, BtfError, KernelBtf
from tests.support import need


@pytest.fixture(scope="module")
def btf() -> KernelBtf:
    need(VMLINUX_BTF.exists(), f"no kernel BTF at {VMLINUX_BTF}", "a kernel built with CONFIG_DEBUG_INFO_BTF")
    return KernelBtf()


def test_the_cgroup_id_walk_resolves_on_this_kernel(btf: KernelBtf) -> None:
    offsets = btf.pointer_chain(CGROUP_ID_WALK)
    assert len(offsets) == 4 and all(0 <= off < 16384 and off % 8 == 0 for off in offsets)
    # the task's css_set pointer sits deep in task_struct, past its scheduling state
    assert offsets[0] > 1000


def test_a_walk_that_does_not_match_the_kernel_says_where(btf: KernelBtf) -> None:
    with pytest.raises(BtfError, match=r"task_struct\.pid is not a pointer to struct css_set"):
        btf.pointer_chain((("task_struct", "pid"), ("css_set", "dfl_cgrp")))
    with pytest.raises(BtfError, match="struct task_struct has no field no_such_field"):
        btf.member("task_struct", "no_such_field")
    with pytest.raises(BtfError, match="no struct no_such_struct"):
        btf.member("no_such_struct", "x")


def test_a_file_that_is_not_btf_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "vmlinux"
    p.write_bytes(b"\0" * 64)
    with pytest.raises(BtfError, match="is not BTF"):
        KernelBtf(p)
