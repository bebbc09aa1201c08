"""The scaling loop end to end, in the lab: primary and shadow hosts in their own namespaces, a CPU load in
the primary's cgroup that steps up and down, then a real trace replayed as its demand, and the shadow's
limit read from its own cgroup files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lab.replay import replay
from lab.runner import Lab, LabError
from lab.scenario import Row, step_load
from lab.spec import Spec, Timings
from shadowplane.v1 import fleet_pb2 as fpb
from tests.support import need_root
from training.traces import load_trace

INTERVAL = 2.0
BEFORE, DURING, AFTER = 8.0, 14.0, 18.0
BASELINE, HIGH = 0.1, 0.8


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[Lab, list[Row]]]:
    need_root()
    with Lab.up(Spec(shadows=1, timings=Timings(scaling_interval_seconds=INTERVAL))) as lab:
        lab.wait_owner(None, "p1", 30)
        rows = step_load(
            lab, baseline=BASELINE, high=HIGH, before=BEFORE, during=DURING, after=AFTER, sample=0.5
        )
        yield lab, rows


def test_shadow_limit_follows_the_step_up_within_one_interval(run: tuple[Lab, list[Row]]) -> None:
    _, rows = run
    baseline = [r for r in rows if 3.0 <= r.t < BEFORE]
    assert baseline and max(r.shadow_cpu_limit_cores for r in baseline) <= 0.3, "small before the step"
    seen = next(r.t for r in rows if r.t >= BEFORE and (r.forecast_q50_cores or 0) >= 0.5)
    raised = next(r.t for r in rows if r.t >= BEFORE and r.shadow_cpu_limit_cores >= 0.7)
    # the forecast is read from the decision that applied the limit, so "seen" and "raised" come from the same
    # cycle; the cgroup file and the sampling of this test may lag it by one interval at most
    assert raised <= seen + INTERVAL + 0.5, (seen, raised)
    assert raised <= BEFORE + 4 * INTERVAL, "within a few seconds of the step"
    high = [r for r in rows if BEFORE + 4 * INTERVAL <= r.t < BEFORE + DURING]
    # The rule holds an allocation while the prediction stays within its band (adds only above alloc x 1.2),
    # so a limit down to HIGH / 1.2 is the rule at work (0.73 against 0.77 measured, on a slow machine);
    # below that band while the demand lasts would be a cycle that missed it.
    low = [(r.t, r.shadow_cpu_limit_cores) for r in high if r.shadow_cpu_limit_cores < HIGH / 1.2]
    assert high and not low, f"covers the demand while it lasts, within the rule's band: {low}"


def test_shadow_limit_comes_back_down(run: tuple[Lab, list[Row]]) -> None:
    _, rows = run
    tail = [r for r in rows if r.t >= BEFORE + DURING + AFTER - 3]
    assert tail and max(r.shadow_cpu_limit_cores for r in tail) <= 0.35
    assert all(r.shadow_cgroup == "/splab/s1/web" for r in rows)


def test_every_decision_is_recorded_with_its_forecast(run: tuple[Lab, list[Row]]) -> None:
    lab, _ = run
    plan = lab.fleet().GetPlan(fpb.GetPlanRequest(workload="s1/web", last=200), timeout=5)
    cpu = [d for d in plan.last if d.resource == "cpu"]
    branches = {d.branch for d in cpu}
    assert {"add", "remove"} <= branches
    for d in cpu:
        assert d.demand_from == "p1/web" and "q0.5" in d.forecast and "target" in d.forecast
        assert d.result in ("applied", "unchanged")
    assert plan.shadows[0].ready


def test_a_replayed_trace_gets_the_limits_the_backtest_replays(
    run: tuple[Lab, list[Row]], data_dir: Path
) -> None:
    lab, _ = run
    trace = load_trace(data_dir / "nab_rds_cpu_cc0c53_3d.csv")
    with pytest.raises(LabError, match="--speed 150"):
        replay(lab, trace, speed=100, warmup_rows=1, rows=1)
    r = replay(lab, trace, speed=300 / INTERVAL, peak_cores=0.8, start_row=400, warmup_rows=6, rows=20)
    assert [s.row for s in r.steps] == list(range(400, 426))
    assert r.measured_steps >= 18, "the agent measured the demand of (nearly) every step"
    # the shadow's real cgroup limit is, step by step, what the backtest's path makes of the measured demand
    assert r.same_limit_share >= 0.9, r.text()
    assert abs(r.lab.coverage - r.backtest_measured.coverage) <= 0.1, r.text()
    asked = np.array([s.asked_cores for s in r.steps])
    assert asked.max() == pytest.approx(0.8) and np.all(r.measured[6:] > 0)
