"""Feature building: normalisation, unknown values, calendar, cycles, and no look-ahead."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from controller.predict import features as F
from controller.predict.engine import PredictionEngine
from controller.predict.features import FeatureSpec, build_features, detect_periods, fill_unknown
from controller.predict.series import SeriesBatch
from training.backtest import forecast_origins
from training.traces import Trace

SPEC = FeatureSpec()


def col(name: str) -> int:
    return SPEC.names().index(name)


def test_fill_unknown_uses_the_last_known_value_and_the_first_for_leading_gaps() -> None:
    h = np.array([[np.nan, np.nan, 3.0, np.nan, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0], [np.nan] * 5])
    out = fill_unknown(h)
    assert out.tolist() == [[3, 3, 3, 3, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]]


def test_normalisation_is_level_median_of_last_three_and_scale_mean_step_change() -> None:
    rng = np.random.default_rng(0)
    v = 50 + np.cumsum(rng.normal(0, 1, 400))
    f = build_features(v[None, -SPEC.history_steps(300) :], np.array([0.0]), 300, SPEC)
    level = float(np.median(v[-3:]))
    scale = float(np.mean(np.abs(np.diff(v[-(SPEC.tail_window + 1) :]))))
    assert f.level[0] == pytest.approx(level)
    assert f.scale[0] == pytest.approx(scale)
    # the recent window is the raw values in those units (none is beyond the squash limit here)
    want = (v[-SPEC.window :] - level) / scale
    np.testing.assert_allclose(f.x[0, : SPEC.window], want, rtol=1e-5, atol=1e-5)
    assert f.x.shape == (1, SPEC.n_features) == (1, len(SPEC.names()))


def test_flat_and_all_zero_series_get_a_finite_unit() -> None:
    h = np.vstack([np.full(300, 7.0), np.zeros(300)])
    f = build_features(h, np.zeros(2), 300, SPEC)
    assert f.scale.tolist() == pytest.approx([7e-3, 1e-9])
    assert np.isfinite(f.x).all()


def test_inputs_beyond_the_limit_are_squashed_but_stay_ordered() -> None:
    x = np.array([[5.0, -19.0, 25.0, 1e3, 1e9, -1e9]])
    out = F._squash(x.copy(), 20.0)
    assert out[0, :2].tolist() == [5.0, -19.0]  # inside the limit: unchanged
    assert 20 < out[0, 2] < out[0, 3] < out[0, 4] < 50
    assert out[0, 5] == -out[0, 4]


def test_short_history_marks_yesterday_unknown_and_has_no_nan() -> None:
    h = np.full((2, SPEC.history_steps(300)), np.nan)
    h[0, -20:] = np.arange(20.0)  # a new workload: 20 steps known
    h[1, :] = np.arange(h.shape[1], dtype=float)  # a full day known
    f = build_features(h, np.zeros(2), 300, SPEC)
    assert np.isfinite(f.x).all()
    assert f.x[0, col("day_known")] == 0.0 and f.x[1, col("day_known")] == 1.0


def test_rows_are_independent_and_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    h = rng.gamma(2.0, 10.0, size=(7, SPEC.history_steps(300)))
    ts = 1.4e9 + 300 * np.arange(7.0)
    together = build_features(h, ts, 300, SPEC)
    alone = [build_features(h[i : i + 1], ts[i : i + 1], 300, SPEC).x[0] for i in range(7)]
    np.testing.assert_allclose(together.x, np.vstack(alone), rtol=1e-6)
    monkeypatch.setattr(F, "CHUNK_ROWS", 3)
    chunked = build_features(h, ts, 300, SPEC)
    np.testing.assert_array_equal(chunked.x, together.x)
    np.testing.assert_array_equal(chunked.scale, together.scale)


def test_calendar_features_are_points_on_circles() -> None:
    monday_midnight = datetime(2014, 2, 17, tzinfo=UTC).timestamp()  # a Monday
    c = F.calendar(np.array([monday_midnight, monday_midnight + 6 * 3600, monday_midnight + 3 * 86400]))
    np.testing.assert_allclose(c[0], [0, 1, 0, 1], atol=1e-12)
    np.testing.assert_allclose(c[1, :2], [1, 0], atol=1e-12)  # 06:00 is a quarter turn
    thursday = 2 * math.pi * 3 / 7
    np.testing.assert_allclose(c[2, 2:], [math.sin(thursday), math.cos(thursday)], atol=1e-12)


def test_the_calendar_features_are_those_of_the_first_forecast_step() -> None:
    t = datetime(2014, 2, 17, 23, 55, tzinfo=UTC).timestamp()
    f = build_features(np.ones((1, 300)), np.array([t]), 300, SPEC)
    assert f.x[0, col("tod_sin")] == pytest.approx(0.0, abs=1e-6)  # 00:00 next day
    assert f.x[0, col("tod_cos")] == pytest.approx(1.0)


def test_detect_periods_finds_a_regular_job_and_nothing_in_noise() -> None:
    rng = np.random.default_rng(5)
    t = np.arange(SPEC.history_steps(300))
    job = 10 + 5 * (t % 8 == 3) + rng.normal(0, 0.1, len(t))
    noise = rng.normal(10, 1, len(t))
    short = np.full(len(t), np.nan)
    short[-50:] = job[-50:]
    p = detect_periods(np.vstack([job, noise, short]), SPEC)
    assert p.lag[0] == 8 and p.log_error[0] < -2  # far better than "same as now"
    assert p.log_error[1] > -0.3  # no lag beats the last value by much in white noise
    assert p.lag[2] == 0  # too short to tell


def test_cycle_features_predict_an_exactly_periodic_series() -> None:
    t = np.arange(SPEC.history_steps(300) + SPEC.horizon)
    v = (np.where(t % 5 == 0, 50.0, 10.0) + (t % 5)).astype(np.float64)
    h = v[None, : -SPEC.horizon]
    f = build_features(h, np.zeros(1), 300, SPEC)
    future = (v[-SPEC.horizon :] - f.level[0]) / f.scale[0]
    got = [f.x[0, col(f"cycle_ago[+{k}]")] for k in range(1, SPEC.horizon + 1)]
    mean = [f.x[0, col(f"cycle_mean[+{k}]")] for k in range(1, SPEC.horizon + 1)]
    np.testing.assert_allclose(got, future, rtol=1e-5)
    np.testing.assert_allclose(mean, future, rtol=1e-5)
    assert f.x[0, col("cycle_length")] == pytest.approx(5 / SPEC.lag_max)


def test_sliding_history_has_no_look_ahead() -> None:
    v = np.arange(10.0)
    h = F.sliding_history(v, 4)
    assert h.shape == (10, 4)
    assert np.isnan(h[0, :3]).all() and h[0, 3] == 0
    assert h[6].tolist() == [3, 4, 5, 6]  # the row for origin 6 ends at 6
    assert (np.nan_to_num(h, nan=-1).max(axis=1) == v).all()


def test_resample_means_rates_maxes_memory_and_leaves_gaps_unknown() -> None:
    end_s = np.array([10.0, 250.0, 300.0, 910.0, 1190.0])
    v = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    grid, mean = F.resample(end_s, v, 300)
    assert grid.tolist() == [300.0, 600.0, 900.0, 1200.0]
    assert mean[0] == pytest.approx(3.0) and np.isnan(mean[1]) and np.isnan(mean[2])
    assert mean[3] == pytest.approx(8.0)
    _, mx = F.resample(end_s, v, 300, how="max")
    assert mx[0] == 5.0 and mx[3] == 9.0


def test_feature_spec_round_trips_through_a_dict() -> None:
    d = SPEC.to_dict()
    assert FeatureSpec.from_dict(d) == SPEC
    with pytest.raises(ValueError, match="unknown feature settings"):
        FeatureSpec.from_dict({**d, "bogus": 1})


def test_periods_are_detected_once_per_hour_of_steps_counted_from_the_epoch() -> None:
    """At the model's step (300 s) a slot is an hour of the clock; a lab compressing time (1 s per step)
    counts the same 12 steps on its grid. Within a slot every origin looks back to the slot's first step."""
    hour = 3600.0 * 500_000
    slot, back = F.period_slots(np.array([hour, hour + 300, hour + 3300, hour + 3600]), 300, 12)
    assert back.tolist() == [0, 1, 11, 0] and slot[0] == slot[2] and slot[3] == slot[0] + 1
    slot, back = F.period_slots(np.array([120.0, 121.0, 131.0, 132.0]), 1.0, 12)
    assert back.tolist() == [0, 1, 11, 0] and slot.tolist() == [10, 10, 10, 11]
    assert F.period_slots(np.array([5.0, 6.0]), 300, 0)[1].tolist() == [0, 0]  # 0: at every origin
    assert F.refresh_steps(3600, 300) == 12 and F.refresh_steps(0, 300) == 0


def test_a_lab_compressing_time_forecasts_what_the_backtest_replays() -> None:
    """The engine fed one origin after another on a 1 s grid (a lab at 300x: `grid_seconds`) makes the
    curves `forecast_origins` makes of the same series spaced 1 s: the periods come from the same history."""
    engine = PredictionEngine()
    steps = engine.history_steps
    rng = np.random.default_rng(3)
    n = steps + 40
    k = np.arange(n)
    values = 1 + 0.5 * np.sin(2 * math.pi * k / 7) + rng.gamma(2, 0.05, n)  # a cycle of 7 steps, noise
    ts = 1_790_000_000 + k  # 1 s apart
    curves = forecast_origins(engine.forecaster, Trace("lab", ts.astype(np.int64), values), step_seconds=300)
    hist = F.sliding_history(values, steps)
    for o in range(steps - 1, n):
        batch = SeriesBatch(
            keys=("p1/web",),
            origin_ts=np.array([float(ts[o])]),
            step_seconds=300,
            values=np.asarray(hist[o])[None, None, :],
            resources=("cpu",),
            grid_seconds=1.0,
        )
        got = engine.forecast(batch).curve("p1/web", "cpu")
        np.testing.assert_allclose(got, curves[o], rtol=1e-9, err_msg=f"origin {o}")
