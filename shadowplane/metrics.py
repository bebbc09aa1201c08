"""Prometheus plumbing shared by both daemons: the [metrics] config, the HTTP endpoint, log2 histograms."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily

from shadowplane.config import check

log = logging.getLogger(__name__)


def _listen(v: str) -> str | None:
    if not v:
        return None
    host, sep, port = v.rpartition(":")
    return None if sep and host and port.isdigit() else f"must be HOST:PORT (e.g. 127.0.0.1:9464), got {v!r}"


@dataclass
class MetricsConfig:
    listen: str = field(
        default="", metadata=check(_listen, doc="HOST:PORT serving Prometheus /metrics (empty: off)")
    )


def serve(cfg: MetricsConfig, registry: CollectorRegistry) -> None:
    """Start /metrics on its own thread; scrapes never touch the daemon's event loop."""
    if not cfg.listen:
        return
    host, _, port = cfg.listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    log.info("metrics on http://%s/metrics", cfg.listen)


def add_log2(
    fam: HistogramMetricFamily, labels: Sequence[str], counts: Sequence[int], unit_seconds: float
) -> None:
    """A log2 histogram (bucket i holds [2^i, 2^(i+1)) units) as a Prometheus histogram in seconds. The sum
    is estimated from bucket midpoints: the kernel keeps counts, not sums."""
    buckets: list[tuple[str, float]] = []
    cum = 0
    total = 0.0
    for i, n in enumerate(counts):
        cum += n
        upper = (1 << (i + 1)) * unit_seconds
        total += n * 1.5 * (1 << i) * unit_seconds if i else n * 0.5 * unit_seconds
        buckets.append((repr(upper), float(cum)))
    buckets.append(("+Inf", float(cum)))
    fam.add_metric(list(labels), buckets, total)
