"""When the agent times syscall latency: windows of `capture.syscall_latency_window_seconds` in every
`capture.syscall_latency_period_seconds`, each at a random point of its period.

Counting a syscall needs only sys_enter; timing it needs sys_exit too, and an attached sys_exit costs every
syscall of every process on the host, captured or not. So sys_exit is attached only while a window is open.
The random start keeps a periodic job from always (or never) falling inside a window.

What the latency histogram then represents: a sample (1 in `syscall_latency_sample_every` of the workload's
calls on each CPU) of the calls that start and end inside a window, about window/period of the time. A call
longer than a window is rarely seen whole, so blocking calls (a long epoll_wait, futex) are
under-represented; `SyscallProfile.latency_timed_seconds` says how long the histogram of each sample covers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowPlan:
    window_seconds: float
    period_seconds: float

    @property
    def mode(self) -> Literal["off", "always", "windows"]:
        if self.window_seconds <= 0:
            return "off"
        return "always" if self.window_seconds >= self.period_seconds else "windows"

    @property
    def duty(self) -> float:
        """Share of the time latency is timed."""
        return {"off": 0.0, "always": 1.0}.get(self.mode, self.window_seconds / self.period_seconds)

    def describe(self) -> str:
        if self.mode == "off":
            return "syscall latency not timed (capture.syscall_latency_window_seconds = 0); counts exact"
        if self.mode == "always":
            return "syscall latency timed always (sys_exit attached all the time)"
        return (
            f"syscall latency timed {self.window_seconds:g} s in every {self.period_seconds:g} s "
            f"(sys_exit attached only then)"
        )


async def run_windows(
    plan: WindowPlan,
    time_latency: Callable[[bool], None],
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Open and close timing windows until cancelled. `time_latency(on)` attaches or detaches sys_exit (in a
    worker thread: it can take milliseconds, and this loop also serves the leases). A failure to attach is
    said once with what is lost; the counts go on."""
    rng = rng or random.Random()
    try:
        if plan.mode == "off":
            return
        if plan.mode == "always":
            await asyncio.to_thread(time_latency, True)
            return
        while True:
            before = rng.uniform(0.0, plan.period_seconds - plan.window_seconds)
            await sleep(before)
            await asyncio.to_thread(time_latency, True)
            await sleep(plan.window_seconds)
            await asyncio.to_thread(time_latency, False)
            await sleep(plan.period_seconds - plan.window_seconds - before)
    except OSError as e:
        log.error("syscall latency is not timed: %s (syscall counts are unaffected)", e)
