"""Shared fixtures, and CI's rule that no test skips."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Iterator

import pytest

from agentd.cgroupfs import CgroupLayout
from tests.support import Workload, in_ci, need_root


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI=true a skip is a failure: CI has root, BPF and every tool, so a test that skips there is a
    test that silently stopped running. `tests.support.need` already fails under CI; this catches every
    other skip (a bare pytest.skip, a skipif mark, a plugin's)."""
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true, where every test must run: {reason} "
            "(make the host provide it, e.g. `make setup` as root, or use tests.support.need to say how)"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _fail_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield  # a module that skips as a whole (pytest.skip(..., allow_module_level=True))
    _fail_skip_in_ci(report)
    return report


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
