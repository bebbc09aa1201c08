from __future__ import annotations

from agentd.link import Backlog
from shadowplane.histogram import quantile, render
from shadowplane.v1 import agent_pb2 as apb


def test_quantile_interpolates_inside_log2_buckets() -> None:
    counts = [0, 0, 0, 10]  # all values in [8, 15]
    assert quantile(counts, 0.5) == 12.0
    assert quantile([], 0.5) is None
    q99 = quantile([90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10], 0.99)
    assert q99 is not None and 1024 <= q99 <= 2047


def test_render_skips_empty_edges() -> None:
    text = render([0, 0, 5, 1, 0, 0], "usecs")
    assert text.count("\n") == 2 and "4 -> 7" in text


def test_backlog_is_bounded_and_acks_cumulatively() -> None:
    b = Backlog(max_batches=3)
    for seq in range(1, 6):
        b.add(apb.TelemetryBatch(seq=seq))
    assert [x.seq for x in b.after(0)] == [3, 4, 5]
    assert b.dropped_total == 2
    b.ack(4)
    assert [x.seq for x in b.after(0)] == [5]
    b.add(apb.TelemetryBatch(seq=6))
    b.drop(5)
    assert [x.seq for x in b.after(0)] == [6]
    assert b.after(6) == []
