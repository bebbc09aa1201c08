from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.registry import Collector

from controller.metrics import EventCounters
from controller.store import EventRecord
from shadowplane.metrics import add_log2


class One(Collector):
    def __init__(self, fam: HistogramMetricFamily) -> None:
        self.fam = fam

    def collect(self):  # type: ignore[no-untyped-def]
        yield self.fam


def test_log2_buckets_become_a_cumulative_histogram_in_seconds() -> None:
    fam = HistogramMetricFamily("x_latency_seconds", "test", labels=["w"])
    add_log2(fam, ["web"], [2, 0, 3], 1e-6)  # 2 in [0,2) us, 3 in [4,8) us
    reg = CollectorRegistry()
    reg.register(One(fam))
    text = generate_latest(reg).decode()
    assert 'x_latency_seconds_bucket{le="2e-06",w="web"} 2.0' in text
    assert 'x_latency_seconds_bucket{le="4e-06",w="web"} 2.0' in text
    assert 'x_latency_seconds_bucket{le="8e-06",w="web"} 5.0' in text
    assert 'x_latency_seconds_bucket{le="+Inf",w="web"} 5.0' in text
    assert 'x_latency_seconds_count{w="web"} 5.0' in text


def test_transition_events_are_counted_with_their_durations() -> None:
    k = EventCounters()
    k(EventRecord("failover-complete", "web", "s1", "p1 -> s1 in 310 ms", 1, {"took_ms": "310"}))
    k(EventRecord("failback-complete", "web", "p1", "s1 -> p1 in 40 ms", 2, {"took_ms": "40"}))
    k(EventRecord("health", "web", "p1", "down", 3))
    assert k.transitions == {("web", "failover"): 1, ("web", "failback"): 1}
    # buckets 0.1, 0.25, 0.5 ...: 0.04 s falls in all three, 0.31 s from 0.5 on
    assert k.durations["web"][:3] == [1, 1, 2] and k.durations["web"][-1] == 2
    assert k.by_kind["health"] == 1


def promtool_check(text: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing: apt-get install prometheus (make setup does)")
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr
