"""The store's resource series, training from the store, and the engine's history from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from controller.predict.engine import PredictionEngine
from controller.predict.model import load_model
from controller.predict.step_history import history_from_store
from controller.store.sqlite import SqliteStore
from shadowctl.cli import main
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

T0 = 1_700_000_000_000  # ms
INTERVAL = 60_000


def fill(store: SqliteStore, steps: int, skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    hello = apb.Hello(
        host="h1", instance_id="i1", workloads=[tpb.WorkloadInfo(name="web"), tpb.WorkloadInfo(name="db")]
    )
    store.register_agent(hello, "peer", T0)
    rng = np.random.default_rng(0)
    for i in range(steps):
        if i in skip:
            continue
        start, end = T0 + i * INTERVAL, T0 + (i + 1) * INTERVAL
        samples = []
        for name, cores in (("web", 2.0), ("db", 0.5)):
            cpu = cores * (1 + 0.5 * np.sin(i / 30)) + rng.normal(0, 0.05)
            samples.append(
                tpb.WorkloadSample(
                    workload=name,
                    cgroup=f"/{name}",
                    start_unix_ms=start,
                    end_unix_ms=end,
                    resources=tpb.Resources(
                        cpu_seconds=max(cpu, 0) * 60, memory_bytes=1_000_000 + i, io_read_bytes=6000 * i
                    ),
                    syscalls=tpb.SyscallProfile(total=600 * (i + 1), by_name={"accept4": 60}),
                )
            )
        store.append_batch("h1", "i1", apb.TelemetryBatch(seq=i + 1, samples=samples), end)


def test_resource_series_returns_columns_per_workload_oldest_first(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    fill(store, 10)
    cols = store.resource_series()
    assert sorted(cols) == [("h1", "db"), ("h1", "web")]
    web = cols[("h1", "web")]
    assert web["end_ms"] == [float(T0 + (i + 1) * INTERVAL) for i in range(10)]
    assert web["memory_bytes"][3] == 1_000_003 and web["io_bytes_per_second"][2] == pytest.approx(200.0)
    assert web["accepts_per_second"][0] == pytest.approx(1.0)
    assert len(store.resource_series(since_ms=T0 + 8 * INTERVAL)[("h1", "db")]["end_ms"]) == 3
    assert list(store.resource_series(workload="db")) == [("h1", "db")]
    assert store.resource_series(host="nobody") == {}


def test_history_from_store_is_one_batch_with_gaps_unknown(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    fill(store, 40, skip={35})
    now = T0 + 40 * INTERVAL
    b = history_from_store(store, now, step_seconds=60, steps=50)
    assert b.keys == ("h1/db", "h1/web") and b.values.shape == (2, 3, 50)
    assert b.signals is not None and b.signals.shape == (2, 2, 50)
    assert np.isnan(b.values[:, :, :10]).all(), "before the first sample"
    assert np.isnan(b.values[1, 0, 45]) and not np.isnan(b.values[1, 0, 44]), "the skipped step"
    assert b.values[1, 1, -1] == 1_000_039
    fc = PredictionEngine(None).forecast(b)
    assert fc.curves.shape[:2] == (2, 3) and np.isfinite(fc.curves).all()


def test_train_from_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "c.db"
    store = SqliteStore(db)
    fill(store, 200)
    store.close()
    out = tmp_path / "m.onnx"
    code = main(
        [
            "train",
            "--store",
            str(db),
            "--since-hours",
            "0",
            "--step-seconds",
            "60",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--hidden",
            "4",
            "--synthetic",
            "0",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    info = load_model(out).info
    assert info.training_data["source"].startswith(f"store {db}")
    assert info.training_data["series"] == [
        f"h1/{w}/{r}" for w in ("db", "web") for r in ("cpu", "memory", "io")
    ]
    assert info.step_seconds == 60
    code = main(["train", "--store", str(tmp_path / "none.db"), "--out", str(out)])
    assert code == 2 and "store file not found" in capsys.readouterr().err
