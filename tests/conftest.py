"""Shared fixtures."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from agentd.cgroupfs import CgroupLayout
from tests.support import Workload, need_root


@pytest.fixture
def workload_cgroup() -> Iterator[Workload]:
    need_root()
    layout = CgroupLayout.detect()
    path = f"/sp-test-{uuid.uuid4().hex[:8]}"
    layout.ensure(path)
    w = Workload(layout, path)
    try:
        yield w
    finally:
        w.kill_all()
        for _ in range(50):
            try:
                layout.remove(path)
                break
            except OSError:
                time.sleep(0.1)
