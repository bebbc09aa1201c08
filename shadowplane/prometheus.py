"""Prometheus plumbing shared by both daemons: the [metrics] config, the HTTP endpoint, log2 histograms.

Each daemon's collector (agentd/prometheus_collector.py, controller/prometheus_collector.py) renders the
daemon's status view at scrape time. The endpoint runs in the daemon's event loop, not in
prometheus_client's thread: the state behind the view (dicts of sessions, observations, leases, and the
controller's SQLite connection) is owned and mutated by the loop, and reading it from another thread can
fail mid-scrape ("dictionary changed size during iteration") or interleave with the store's transactions.
Run in the loop, a scrape sees one consistent moment and needs no locks; it costs the loop a few
milliseconds, far inside the lease margins.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily

from shadowplane.config import check

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 10.0
LANDING = b'<html><body><h1>Shadowplane</h1><p><a href="/metrics">/metrics</a></p></body></html>\n'


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


# The serving tasks, referenced so they are not garbage-collected; asyncio.run() cancels them at exit,
# which closes the listening socket.
_tasks: set[asyncio.Task[None]] = set()


def serve(cfg: MetricsConfig, registry: CollectorRegistry) -> None:
    """Serve /metrics from the running event loop. The port is bound before this returns, so a port that
    cannot be bound fails the daemon's start with an OSError naming the key, like any other listen key."""
    if not cfg.listen:
        return
    host, _, port = cfg.listen.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_server(
            (host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as e:
        raise OSError(f"metrics.listen: cannot listen on {cfg.listen}: {e.strerror or e}") from e
    task = asyncio.get_running_loop().create_task(_serve(sock, registry))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    log.info("metrics on http://%s/metrics", cfg.listen)


async def _serve(sock: socket.socket, registry: CollectorRegistry) -> None:
    endpoint = Endpoint(registry)
    server = await asyncio.start_server(endpoint.handle, sock=sock)
    async with server:
        await server.serve_forever()


class Endpoint:
    """GET /metrics over HTTP/1.1, one request per connection (Prometheus reconnects at each scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return  # not HTTP, too slow, or headers beyond the reader's 64 KiB: hang up
            status, headers, body = self.respond(head)
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
            lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass  # the scraper went away: nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def respond(self, head: bytes) -> tuple[str, dict[str, str], bytes]:
        """(status, headers, body) for one request head."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split()
        if len(parts) != 3:
            return "400 Bad Request", {"Content-Type": "text/plain"}, b"bad request\n"
        method, target, _ = parts
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {"Allow": "GET, HEAD", "Content-Type": "text/plain"}, b""
        path = urlsplit(target).path
        if path == "/":
            return "200 OK", {"Content-Type": "text/html; charset=utf-8"}, LANDING
        if path != "/metrics":
            return "404 Not Found", {"Content-Type": "text/plain"}, b"not found: see /metrics\n"
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        try:
            body = encoder(self.registry)
        except Exception:  # a broken collector must not take the daemon down; say so where admins look
            log.exception("metrics: collecting failed")
            return "500 Internal Server Error", {"Content-Type": "text/plain"}, b"collecting failed\n"
        out = {"Content-Type": content_type}
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)  # scrapes are frequent: speed over ratio
            out["Content-Encoding"] = "gzip"
        return "200 OK", out, body


def log2_buckets(
    counts: Sequence[int], unit_seconds: float, buckets: int
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (+Inf last) and an estimated sum, in seconds, from a log2 histogram of
    `buckets` buckets (the kernel's histogram length: the agent reads it from the capture program).

    counts[i] holds values in [2^i, 2^(i+1)) units (counts[0] also holds 0), so bucket i becomes
    le = 2^(i+1) units. The set of `le` values is the same on every scrape whatever the data (telemetry
    trims trailing empty buckets; Prometheus needs stable buckets to rate and aggregate them). The kernel
    clamps larger values into its last bucket, whose upper bound is therefore unknown: it counts towards
    +Inf only (a syscall blocked for minutes must not read as "under 4.3 s").

    The kernel keeps counts, not sums: the sum is estimated from bucket midpoints (1.5 x 2^i; 0.5 for
    bucket 0), within a third of the truth, enough for averages.
    """
    padded = list(counts[:buckets]) + [0] * max(0, buckets - len(counts))
    padded[-1] += sum(counts[buckets:])
    out: list[tuple[str, float]] = []
    cum = 0
    total = 0.0
    for i, n in enumerate(padded):
        cum += n
        total += n * (1.5 * (1 << i) if i else 0.5)
        if i < buckets - 1:
            out.append((repr((1 << (i + 1)) * unit_seconds), float(cum)))
    out.append(("+Inf", float(cum)))
    return out, total * unit_seconds


def add_log2(
    fam: HistogramMetricFamily,
    labels: Sequence[str],
    counts: Sequence[int],
    unit_seconds: float,
    buckets: int,
) -> None:
    """Add one log2 histogram (see `log2_buckets`) to `fam` as a Prometheus histogram in seconds."""
    le, total = log2_buckets(counts, unit_seconds, buckets)
    fam.add_metric(list(labels), le, total)
