"""The event loop that answers lease renewals is never the one that prunes, serves large queries or
backtests: those run in the store worker (its own thread and connection), and each daemon exports how late
its loop runs as a histogram."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from controller.config import ControllerConfig, ScalingConfig, StoreConfig
from controller.server import start
from controller.store import SqliteStore
from controller.store.sqlite import PRUNE_CHUNK_ROWS
from shadowplane.loop_lag import LoopLag
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import telemetry_pb2 as tpb

DAY_MS = 24 * 3600 * 1000


class ThreadRecordingStore(SqliteStore):
    """The real SQLite store, noting which thread runs each large read and the prune."""

    calls: list[tuple[str, int]] = []

    def compact(self, older_than_ms: int, step_ms: int) -> int:
        self.calls.append(("compact", threading.get_ident()))
        return super().compact(older_than_ms, step_ms)

    def prune(self, older_than_ms: int) -> int:
        self.calls.append(("prune", threading.get_ident()))
        return super().prune(older_than_ms)

    def sample_blobs(
        self, host: str, workload: str = "", cgroup: str = "", since_ms: int = 0, limit: int = 60
    ) -> list[tuple[str, bytes]]:
        self.calls.append(("sample_blobs", threading.get_ident()))
        return super().sample_blobs(host, workload, cgroup, since_ms, limit)

    def another_connection(self) -> SqliteStore:
        other = super().another_connection()
        other.__class__ = ThreadRecordingStore
        return other


def seed(store: SqliteStore, old: int, recent: int) -> None:
    now = int(time.time() * 1000)
    store.register_agent(
        apb.Hello(host="h1", instance_id="i1", workloads=[tpb.WorkloadInfo(name="web", service="web")]),
        "peer",
        now,
    )
    ends = [now - 30 * DAY_MS - i * 1000 for i in range(old)] + [now - i * 1000 for i in range(recent)]
    samples = [
        tpb.WorkloadSample(
            workload="web",
            cgroup="/web",
            start_unix_ms=e - 1000,
            end_unix_ms=e,
            resources=tpb.Resources(cpu_seconds=0.25, memory_bytes=e % 1_000_000),
        )
        for e in ends
    ]
    store.append_batch("h1", "i1", apb.TelemetryBatch(seq=1, samples=samples), now)


def test_pruning_and_large_telemetry_queries_run_in_the_store_worker_with_unchanged_results(
    tmp_path: Path,
) -> None:
    ThreadRecordingStore.calls = []
    store = ThreadRecordingStore(tmp_path / "c.db")
    old = PRUNE_CHUNK_ROWS * 2 + 17  # several chunks
    seed(store, old=old, recent=300)

    async def scenario() -> tuple[int, list[fpb.StoredSample]]:
        cfg = ControllerConfig(
            listen="127.0.0.1:0",
            tls=TlsConfig(plaintext=True),
            store=StoreConfig(path=tmp_path / "c.db"),
            scaling=ScalingConfig(enabled=False),
        )
        c = await start(cfg, store)
        try:
            for _ in range(200):  # the start-up prune, in the worker
                if any(name == "prune" for name, _ in store.calls):
                    break
                await asyncio.sleep(0.05)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{c.port}") as ch:
                got = await fgrpc.FleetStub(ch).GetTelemetry(
                    fpb.GetTelemetryRequest(host="h1", limit=10_000), timeout=30
                )
            return threading.get_ident(), list(got.samples)
        finally:
            await c.stop()

    loop_thread, got = asyncio.run(scenario())
    assert {name for name, _ in ThreadRecordingStore.calls} == {"compact", "prune", "sample_blobs"}
    assert all(thread != loop_thread for _, thread in ThreadRecordingStore.calls)
    check = SqliteStore(tmp_path / "c.db")
    expected = check.samples("h1", limit=10_000)
    assert len(expected) == 300  # every old sample pruned, every recent one kept
    assert [(s.host, s.sample) for s in got] == expected  # the reply built from stored bytes is the same


def test_loop_lag_is_exported_as_a_histogram_in_seconds_with_its_counts() -> None:
    lag = LoopLag()
    for seconds in (0.0005, 0.003, 0.003, 0.03, 7.0):
        lag.record(seconds)
    registry = CollectorRegistry()
    registry.register(lag.collector("shadowplane_controller_loop_lag_seconds", "controller"))
    text = generate_latest(registry).decode()
    assert "# TYPE shadowplane_controller_loop_lag_seconds histogram" in text
    assert 'shadowplane_controller_loop_lag_seconds_bucket{le="0.001"} 1.0' in text
    assert 'shadowplane_controller_loop_lag_seconds_bucket{le="0.005"} 3.0' in text
    assert 'shadowplane_controller_loop_lag_seconds_bucket{le="0.05"} 4.0' in text
    assert 'shadowplane_controller_loop_lag_seconds_bucket{le="5.0"} 4.0' in text  # 7 s is above every bound
    assert 'shadowplane_controller_loop_lag_seconds_bucket{le="+Inf"} 5.0' in text
    assert "shadowplane_controller_loop_lag_seconds_count 5.0" in text
    assert "# UNIT shadowplane_controller_loop_lag_seconds seconds" in generate_openmetrics(registry).decode()


def test_the_probe_sees_a_blocked_loop() -> None:
    lag = LoopLag()

    async def scenario() -> None:
        probe = asyncio.create_task(lag.probe(interval=0.01))
        await asyncio.sleep(0)  # the probe asks to wake in 10 ms ...
        time.sleep(0.2)  # ... and the loop is held for 200 ms
        await asyncio.sleep(0.05)
        probe.cancel()

    asyncio.run(scenario())
    assert lag.max >= 0.15 and lag.count >= 1
