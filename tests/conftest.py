"""Shared fixtures (throwaway workload cgroups; small NAB slices and a tiny model trained once per session,
for the Prediction Engine and training tests), and CI's rule that no test skips."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from agentd.cgroupfs import CgroupLayout
from tests.support import Workload, in_ci, need_root
from training.net import TrainSettings
from training.traces import Trace, load_trace, load_trace_dir
from training.train import TrainedModel, series_from_trace, train_model


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


# The order the suite runs its directories in. `make test` builds the VM image in the background while the
# suite starts (minutes of debootstrap and mkfs on 2 cores): the suites that only count and compare run
# beside it, and the ones that measure time against a bound (lab failovers, etcd faults, the scaling loop)
# run after it, so that a slower CI machine does not turn the build's CPU into their missed deadlines.
SUITE_ORDER = ("unit", "training", "predict", "packaging", "integration", "capture", "cluster", "failover",
               "lab", "scaling", "vm")  # fmt: skip


def _suite_rank(item: pytest.Item) -> int:
    here = Path(__file__).resolve().parent
    path = Path(str(item.path)).resolve()
    # a session of other tests with these hooks (tests/unit/test_ci_skips.py runs one) keeps its order
    parts = path.relative_to(here).parts if path.is_relative_to(here) else ()
    return SUITE_ORDER.index(parts[0]) if len(parts) > 1 and parts[0] in SUITE_ORDER else len(SUITE_ORDER)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_suite_rank)  # stable: each directory keeps its own order


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


DATA = Path(__file__).resolve().parent / "data"
# Tiny but real: enough to learn something, fast enough for CI.
TINY = TrainSettings(hidden=8, epochs=2, batch=256, seed=1)


@pytest.fixture(scope="session")
def tiny_settings() -> TrainSettings:
    return TINY


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def traces() -> list[Trace]:
    return load_trace_dir(DATA)


@pytest.fixture(scope="session")
def periodic_trace() -> Trace:
    return load_trace(DATA / "nab_ec2_cpu_5f5533_3d.csv")


@pytest.fixture(scope="session")
def tiny_model(traces: list[Trace]) -> TrainedModel:
    return train_model([series_from_trace(t) for t in traces], "tests/data", settings=TINY)


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    tiny_model.save(path)
    return path
