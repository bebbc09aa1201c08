"""How late the daemon's event loop runs: a probe both daemons run, exported as a Prometheus histogram.

Lease renewals (every 0.25 s), the controller's HA loop and the agent's self-fencing timer all run on one
asyncio loop; anything that holds it (a long SQLite query, a backtest, a blocking file read) delays them
all. The probe asks to wake every `interval` seconds and records how much later than asked it woke: that
is the delay any timer or RPC on the loop suffered at that moment. Operators alert on its high quantiles;
the benchmark `bench/controller_loop_lag.py` reads it too.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds. Fine below the 20 ms the controller must stay under, coarse above the lease lengths.
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROBE_INTERVAL_SECONDS = 0.05


class LoopLag:
    """Counts of loop lateness per bucket (+Inf last), their sum, and the largest seen."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # not cumulative; bucket i holds (BUCKETS[i-1], BUCKETS[i]]
        self.sum = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.max = max(self.max, seconds)

    @property
    def count(self) -> int:
        return sum(self.counts)

    async def probe(
        self, interval: float = PROBE_INTERVAL_SECONDS, clock: Callable[[], float] | None = None
    ) -> None:
        """Run forever on the loop to be measured (cancel to stop)."""
        loop = asyncio.get_running_loop()
        now = clock or loop.time
        while True:
            asked = now() + interval
            await asyncio.sleep(interval)
            self.record(now() - asked)

    def collector(self, name: str, what: str) -> Collector:
        """A Prometheus collector rendering this as histogram `name` (seconds)."""
        return _LagCollector(self, name, what)


class _LagCollector(Collector):
    def __init__(self, lag: LoopLag, name: str, what: str) -> None:
        self.lag, self.name, self.what = lag, name, what

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(
            self.name,
            f"How much later than asked the {self.what}'s event loop ran a timer "
            "(lease renewals and fencing share this loop)",
            unit="seconds",
        )
        buckets, cum = [], 0
        for le, n in zip((*BUCKETS, float("inf")), self.lag.counts, strict=True):
            cum += n
            buckets.append(("+Inf" if le == float("inf") else repr(le), float(cum)))
        fam.add_metric([], buckets, self.lag.sum)
        yield fam
        yield GaugeMetricFamily(
            self.name.removesuffix("_seconds") + "_max_seconds",
            f"The longest the {self.what}'s event loop ran a timer late since it started",
            value=self.lag.max,
        )
