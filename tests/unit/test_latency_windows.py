"""When syscall latency is timed: the window schedule (agentd/latency_windows.py), with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from agentd.latency_windows import WindowPlan, run_windows


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[float, bool]] = []

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        if self.now > 100:
            raise asyncio.CancelledError

    def toggle(self, on: bool) -> None:
        self.events.append((self.now, on))


def run(plan: WindowPlan) -> Clock:
    clock = Clock()

    async def main() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await run_windows(plan, clock.toggle, random.Random(7), clock.sleep)

    asyncio.run(main())
    return clock


def test_one_window_in_each_period_at_a_random_point() -> None:
    clock = run(WindowPlan(1.0, 10.0))
    opens = [t for t, on in clock.events if on]
    closes = [t for t, on in clock.events if not on]
    assert len(opens) == 10 and len(closes) == 10
    for k, (o, c) in enumerate(zip(opens, closes, strict=True)):
        assert c - o == pytest.approx(1.0)
        assert 10 * k <= o and c <= 10 * (k + 1) + 1e-9, "each window inside its own period"
    offsets = [o - 10 * k for k, o in enumerate(opens)]
    assert max(offsets) - min(offsets) > 2, "not at the same point of every period"


def test_window_equal_to_period_times_always_and_zero_never() -> None:
    assert run(WindowPlan(10.0, 10.0)).events == [(0.0, True)]
    assert run(WindowPlan(0.0, 10.0)).events == []
    assert WindowPlan(1.0, 10.0).duty == 0.1 and WindowPlan(5, 5).duty == 1 and WindowPlan(0, 5).duty == 0


def test_a_failed_attach_stops_timing_but_not_the_agent() -> None:
    def toggle(on: bool) -> None:
        raise PermissionError(1, "attaching to raw tracepoint sys_exit failed: Operation not permitted")

    async def main() -> None:
        await run_windows(WindowPlan(1.0, 2.0), toggle, random.Random(1), Clock().sleep)

    asyncio.run(main())  # returns (logged), does not raise
