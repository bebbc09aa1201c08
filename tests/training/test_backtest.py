"""The backtest's metrics on tiny hand-checkable traces, the baselines by hand, and no look-ahead."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from controller.config import ScalingConfig
from controller.predict.fallback import StatisticalForecaster
from controller.scaling.rule import RuleParams
from training.backtest import (
    BacktestError,
    forecast_origins,
    replay_controller,
    run_backtest,
    scaled_to_coverage,
    write_alloc_csv,
)
from training.baselines import autopilot_max, hindsight_blocks, seed_rule, vpa_recommender
from training.scores import mase, pinball_loss, score_allocation, seasonal_naive
from training.traces import Trace

HOUR = 3600


def test_allocation_scores_by_hand() -> None:
    # 12-hour steps: the first two rows are the warm-up day.
    ts = np.arange(6, dtype=np.int64) * 12 * HOUR
    usage = np.array([99.0, 99.0, 10.0, 20.0, 30.0, 40.0])
    alloc = np.array([0.0, 10.0, 10.0, 15.0, 40.0, 40.0])
    s = score_allocation(ts, usage, alloc)
    assert s.steps == 4
    assert s.coverage == pytest.approx(3 / 4)  # 10>=10, 15<20, 40>=30, 40>=40
    assert s.shortfall == pytest.approx(5 / 100)
    assert s.slack == pytest.approx(10 / 100)
    # limits: 10 (same as the warm-up's last) -> 15 -> 40 -> 40: two changes over 4 steps = 2 days
    assert s.changes_per_day == pytest.approx(2 / 2)


def test_warm_up_counts_rows_not_clock_so_a_clock_step_back_does_not_unscore_rows() -> None:
    ts = np.array([0, 43200, 86400, 90000, 86400, 93600], dtype=np.int64)  # the clock steps back once
    usage = np.ones(6)
    s = score_allocation(ts, usage, np.ones(6))
    assert s.steps == 4 and s.coverage == 1.0


def test_seed_rule_baseline_is_the_controllers_rule() -> None:
    v = np.array([10.0, 10.0, 20.0, 5.0, 5.0])
    # As the controller does with a new shadow: no limit yet -> 10 * 1.5 = 15; 10 < 15 * 0.8 -> remove
    # (15 - 10) * 0.5 -> 12.5; 20 > 12.5 * 1.2 -> add (20 - 12.5) * 1.5 -> 23.75; 5 < 23.75 * 0.8 -> 14.375
    assert seed_rule(v, lead=1).tolist() == [0, 15, 12.5, 23.75, 14.375]
    assert seed_rule(v, lead=2).tolist() == [0, 0, 15, 12.5, 23.75]
    # the controller's parameters, not constants of the backtest's own
    eager = RuleParams(up_threshold=1.0, up_factor=2.0, down_threshold=1.0, down_factor=1.0)
    assert seed_rule(v, lead=1, params=eager).tolist() == [0, 20, 10, 30, 5]


def test_autopilot_is_the_max_of_the_last_24_hours() -> None:
    ts = np.arange(30, dtype=np.int64) * 2 * HOUR  # 2-hour steps: 12 per day
    v = np.zeros(30)
    v[3] = 7.0
    a = autopilot_max(ts, v, lead=1)
    assert a[4] == 7 and a[15] == 7  # sees step 14, window (-4h..28h] holds step 3 at 6h
    assert a[16] == 0  # step 15 at 30h: step 3 (6h) is now 24h old and out


def test_vpa_on_a_constant_series_is_p90_bucket_end_plus_15_percent() -> None:
    ts = np.arange(50, dtype=np.int64) * 300
    a = vpa_recommender(ts, np.full(50, 100.0), lead=1)
    assert 115.0 < a[-1] < 100 * 1.05 * 1.15 + 1e-9
    assert a[0] == 0


def test_vpa_forgets_with_a_24_hour_half_life() -> None:
    day = 288
    ts = np.arange(5 * day, dtype=np.int64) * 300
    v = np.concatenate([np.full(day, 100.0), np.full(4 * day, 10.0)])
    a = vpa_recommender(ts, v, lead=1)
    # a day later the 100s still hold > 10 % of the weight; three more days on, ~4 %: P90 is a 10
    assert a[2 * day] > 100
    assert a[-1] < 13


def test_pinball_and_mase_by_hand() -> None:
    actual = np.array([10.0, 20.0])
    f = np.array([12.0, 12.0])
    # q=0.9: under-forecast 8 costs 0.9*8=7.2, over-forecast 2 costs 0.1*2=0.2 -> mean 3.7
    assert pinball_loss(actual, f, 0.9) == pytest.approx(3.7)
    assert mase(actual, f, naive=np.array([10.0, 10.0])) == pytest.approx(5 / 5)
    assert seasonal_naive(np.arange(6.0), 2, lead=1)[2:].tolist() == [0, 1, 2, 3]
    assert seasonal_naive(np.arange(6.0), 2, lead=3)[4:].tolist() == [0, 1]  # a season back is not known yet


def _trace(values: np.ndarray, step: int = 300) -> Trace:
    return Trace("t", np.arange(len(values), dtype=np.int64) * step + 1_400_000_000, values)


def test_nothing_after_a_step_changes_its_allocation() -> None:
    rng = np.random.default_rng(0)
    v = rng.gamma(2, 10, 700)
    k = 500
    w = v.copy()
    w[k:] *= 50  # a different future
    fc = StatisticalForecaster()
    for lead in (1, 3):
        cfg = ScalingConfig()
        a = replay_controller(
            _trace(v).timestamps, v, forecast_origins(fc, _trace(v)), fc.quantiles, cfg, lead=lead
        ).allocation
        b = replay_controller(
            _trace(w).timestamps, w, forecast_origins(fc, _trace(w)), fc.quantiles, cfg, lead=lead
        ).allocation
        np.testing.assert_array_equal(a[: k + lead], b[: k + lead])
        assert not np.array_equal(a[k + lead :], b[k + lead :])
        for base in (
            seed_rule(v, lead),
            vpa_recommender(_trace(v).timestamps, v, lead),
            autopilot_max(_trace(v).timestamps, v, lead),
        ):
            assert base[:lead].tolist() == [0] * lead
        np.testing.assert_array_equal(seed_rule(v, lead)[: k + lead], seed_rule(w, lead)[: k + lead])
        ts = _trace(v).timestamps
        np.testing.assert_array_equal(
            vpa_recommender(ts, v, lead)[: k + lead], vpa_recommender(ts, w, lead)[: k + lead]
        )
        np.testing.assert_array_equal(
            autopilot_max(ts, v, lead)[: k + lead], autopilot_max(ts, w, lead)[: k + lead]
        )


def test_run_backtest_scores_the_project_and_the_baselines(periodic_trace: Trace, tmp_path: Path) -> None:
    r = run_backtest(periodic_trace, StatisticalForecaster(), lead=1)
    names = ["seed rule", "VPA-style", "VPA @ equal cov.", "Autopilot-style", "hindsight 7/day"]
    assert [b.name for b in r.baselines] == names
    assert r.project.scores.steps == len(periodic_trace) - 288
    assert r.project.scores.coverage > 0.95, "the calibration holds coverage even for the fallback"
    assert len(r.forecast.pinball) == len(r.quantiles) and np.isfinite(r.forecast.mase)
    out = tmp_path / "alloc.csv"
    write_alloc_csv(out, periodic_trace, r)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(periodic_trace)
    assert list(rows[0])[:6] == ["timestamp", "usage", "allocation", "target", "branch", "quantile_used"]
    assert rows[0]["timestamp"] == "2014-02-14 14:27:00"
    # the coverage recomputed from the file is the printed one
    scored = rows[288:]
    cov = np.mean([float(x["allocation"]) >= float(x["usage"]) for x in scored])
    assert cov == pytest.approx(r.project.scores.coverage)


def test_backtest_refuses_what_it_cannot_score(periodic_trace: Trace) -> None:
    with pytest.raises(BacktestError, match="beyond the forecast horizon"):
        run_backtest(periodic_trace, StatisticalForecaster(), lead=7)
    short = Trace("short", periodic_trace.timestamps[:100], periodic_trace.values[:100])
    with pytest.raises(BacktestError, match="warm-up"):
        run_backtest(short, StatisticalForecaster())


def test_vpa_at_equal_coverage_is_scaled_in_hindsight_to_the_projects_coverage() -> None:
    ts = np.arange(20, dtype=np.int64) * 12 * HOUR  # the first two rows are the warm-up day
    usage = np.array([0.0, 0.0, *range(1, 19)], dtype=np.float64)
    alloc = np.full(20, 9.0)
    for cov in (0.5, 0.75, 1.0):
        k = scaled_to_coverage(ts, usage, alloc, cov)
        assert cov <= score_allocation(ts, usage, k).coverage < cov + 1 / 18
        # the smallest such factor: 1 % less misses one more step
        assert score_allocation(ts, usage, k * 0.99).coverage < cov
    r_equal = scaled_to_coverage(ts, usage, alloc, 0.5)
    assert r_equal[5] == pytest.approx(9.0)  # 9 of the 18 scored steps are at or under 9


def test_memory_backtest_counts_steps_with_the_limit_below_usage(periodic_trace: Trace) -> None:
    gib = float(2**30)
    mem = Trace("mem", periodic_trace.timestamps, periodic_trace.values / periodic_trace.values.max() * gib)
    r = run_backtest(mem, StatisticalForecaster(), resource="memory")
    for res in [r.project, *r.baselines]:
        scored = slice(len(mem) - res.scores.steps, None)
        assert res.oom_risk_steps == int(np.sum(res.allocation[scored] < mem.values[scored]))
    # the guard: never below the demand's last known step plus 20 % (less than 1 MiB is not worth a write)
    a, last = r.project.allocation[2:], mem.values[1:-1]
    assert np.all(a >= last * 1.2 - 2**20)
    # and down by at most 10 % a step
    assert np.all(r.project.allocation[2:] >= r.project.allocation[1:-1] * 0.9 - 1)


def test_the_hindsight_bound_spends_its_misses_where_they_save_most() -> None:
    day = 24
    ts = np.arange(3 * day, dtype=np.int64) * HOUR  # hourly steps; blocks of a day with per_day=1
    v = np.ones(3 * day)
    v[day + 5] = 100.0  # one spike on day 2
    v[2 * day :] = 2.0  # day 3 is level at 2
    scored = np.ones(3 * day, dtype=bool)
    # no miss allowed: every block at its own max
    a = hindsight_blocks(ts, v, scored, 1.0, per_day=1)
    assert a[:day].tolist() == [1.0] * day and a[day] == 100.0 and a[2 * day] == 2.0
    # one miss allowed: it goes to the spike, whose block then drops to 1
    a = hindsight_blocks(ts, v, scored, 1 - 1 / (3 * day), per_day=1)
    assert a[day] == 1.0
    assert score_allocation(ts, v, a, warmup_seconds=0).coverage == pytest.approx(1 - 1 / 72)
    assert int(np.sum(np.diff(a) != 0)) == 1, "days 1 and 2 now both at 1: one change, into day 3"
