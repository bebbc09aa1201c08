"""A condition that repeats every second is logged the first time, then once per period, saying how many
occurrences went unlogged."""

from __future__ import annotations

from shadowplane.logs import Throttle


def test_first_time_then_once_per_period_with_the_count_of_quiet_ones() -> None:
    now = [0.0]
    t = Throttle(60.0, clock=lambda: now[0])
    assert t(("s1", "telemetry", "not_finite")) == 0  # first: log it
    for _ in range(5):
        now[0] += 1
        assert t(("s1", "telemetry", "not_finite")) is None
    assert t(("s1", "telemetry", "too_large")) == 0  # another reason is another condition
    now[0] = 61.0
    assert t(("s1", "telemetry", "not_finite")) == 5  # a line again, saying 5 were not logged


def test_keys_are_bounded() -> None:
    t = Throttle(60.0, clock=lambda: 0.0, max_keys=3)
    for k in range(10):
        assert t(k) == 0
    assert len(t._last) <= 3
