"""Failovers and forecast misses as training weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.event_weights import (
    Event,
    EventWeighting,
    event_weights,
    failover_events_from_records,
    find_forecast_misses,
    load_events,
)
from training.traces import Trace
from training.train import apply_events, series_from_trace, split_recent


def test_failover_weighs_its_window_and_the_hour_before() -> None:
    ts = np.arange(0, 4 * 3600, 600, dtype=np.int64)  # 10-minute steps over 4 h
    ev = [Event("failover", "db", 7200, 7800)]
    w = event_weights(ts, ev, "db", EventWeighting(failover=4.0, failover_lead_in_seconds=3600))
    assert w[(ts >= 3600) & (ts <= 7800)].tolist() == [4.0] * 8
    assert set(w[(ts < 3600) | (ts > 7800)].tolist()) == {1.0}
    assert event_weights(ts, ev, "web").tolist() == [1.0] * len(ts), "another workload's failover"
    both = event_weights(ts, [*ev, Event("forecast_miss", "", 0, 0)], "db")
    assert both[0] == 2.0 and both[8] == 4.0


def test_badly_wrong_forecasts_become_merged_windows() -> None:
    ts = np.arange(10, dtype=np.int64) * 300
    usage = np.array([1, 1, 50, 60, 1, 1, 1, 1, 1, -40.0])
    lower, upper = np.zeros(10), np.full(10, 2.0)
    upper[0] = np.nan  # no forecast yet: never a miss
    ev = find_forecast_misses("s", ts, usage, lower, upper, np.ones(10), tolerance=3.0, merge_seconds=600)
    assert [(e.start_s, e.end_s) for e in ev] == [(600, 900), (2700, 2700)]
    assert all(e.kind == "forecast_miss" and e.series == "s" for e in ev)


def test_apply_events_sets_weights_that_training_uses(traces: list[Trace]) -> None:
    s = series_from_trace(traces[0])
    t0 = float(s.timestamps[400])
    (weighted,) = apply_events([s], [Event("failover", s.name, t0, t0 + 600)])
    assert weighted.weights is not None and weighted.weights.max() == 4.0
    assert int((weighted.weights > 1).sum()) == 3600 // 300 + 600 // 300 + 1


def test_split_recent_holds_out_the_end_of_every_series(traces: list[Trace]) -> None:
    series = [series_from_trace(t) for t in traces]
    train, since = split_recent(series, 6 * 3600)
    for s, t in zip(series, train, strict=True):
        assert len(t) == len(s) - 72 and since[s.name] == float(s.timestamps[-1]) - 6 * 3600
        assert t.timestamps[-1] <= since[s.name] < s.timestamps[len(t)]


def test_load_events_reads_iso_and_unix_times_and_names_bad_entries(tmp_path: Path) -> None:
    p = tmp_path / "events.json"
    p.write_text(
        json.dumps(
            [
                {"kind": "failover", "series": "db", "start": "2014-02-14 14:30:00", "end": 1392388500},
                {"kind": "forecast_miss", "start": 0, "end": 60},
            ]
        )
    )
    ev = load_events(p)
    assert ev[0] == Event("failover", "db", 1392388200.0, 1392388500.0) and ev[1].series == ""
    p.write_text(json.dumps([{"kind": "reboot", "start": 0, "end": 1}]))
    with pytest.raises(ValueError, match="entry 0: kind 'reboot'"):
        load_events(p)
    p.write_text(json.dumps([{"kind": "failover", "start": "yesterday", "end": 1}]))
    with pytest.raises(ValueError, match="entry 0: start 'yesterday' is not a time"):
        load_events(p)


def test_failovers_in_the_controllers_event_log_become_training_windows() -> None:
    rows = [
        ("failover-complete", "web", 1_000_000, {"old_owner": "p1"}),
        ("health", "web", 1_000_500, {}),
        ("failback-complete", "web", 1_002_000, {"old_owner": "s1"}),
        ("failover-complete", "db", 1_003_000, {"old_owner": "p9"}),
    ]
    evs = failover_events_from_records(rows, {("p1", "web"): "web"})
    assert [e.series for e in evs] == ["p1/web/cpu", "p1/web/memory", "p1/web/io", ""]
    assert all(e.kind == "failover" for e in evs) and evs[0].start_s == 1000.0
