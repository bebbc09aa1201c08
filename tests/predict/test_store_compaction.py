"""The store's compact history: samples older than [store] raw_hours folded into one row per workload and
forecast step. What the forecaster, training and the champion/challenger backtest read must not change:
the same steps, the same series, the same forecast, the same backtest loss as from the samples themselves,
however the folding was cut into chunks, and with samples arriving late for steps already folded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from controller.config import StoreConfig
from controller.predict.champion import recent_loss
from controller.predict.engine import PredictionEngine
from controller.predict.series import series_from_store
from controller.predict.step_history import history_from_store
from controller.store import sqlite as sqlite_store
from controller.store.sqlite import SqliteStore
from shadowplane.config import ConfigError, build
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

STEP_MS = 300_000  # the packaged model's step
T0 = 1_700_000_000_000
INTERVAL_MS = 30_000
HOURS = 30  # more than the model's day of history
WORKLOADS = ("web", "db", "cache")


def sample(workload: str, end_ms: int, i: int, rng: np.random.Generator) -> tpb.WorkloadSample:
    dur = int(rng.integers(20_000, 40_000))  # irregular: an agent's interval is not exact
    day = 2 * math.pi * end_ms / 86_400_000
    cores = {"web": 2.0, "db": 0.7, "cache": 0.2}[workload] * (1.2 + math.sin(day)) + rng.normal(0, 0.05)
    return tpb.WorkloadSample(
        workload=workload,
        cgroup=f"/{workload}",
        start_unix_ms=end_ms - dur,
        end_unix_ms=end_ms,
        resources=tpb.Resources(
            cpu_seconds=max(cores, 0.0) * dur / 1000,
            memory_bytes=int(1e9 * (1.5 + math.sin(day)) + rng.integers(0, 10**7)),
            io_read_bytes=int(rng.integers(0, 10**6)),
        ),
        syscalls=tpb.SyscallProfile(total=int(rng.integers(0, 10**5)), by_name={"accept4": i % 50}),
    )


def batches() -> list[apb.TelemetryBatch]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(HOURS * 3600_000 // INTERVAL_MS):
        end = T0 + (i + 1) * INTERVAL_MS + int(rng.integers(-3000, 3000))
        samples = []
        for w in WORKLOADS:
            if w == "db" and 1000 < i < 1200:
                continue  # away for a while: those steps stay unknown
            late = 2 * STEP_MS if rng.random() < 0.03 else 0  # a backlog sample for an older step
            samples.append(sample(w, end - late, i, rng))
        out.append(apb.TelemetryBatch(seq=i + 1, samples=samples))
    return out


def filled(path: Path, bs: list[apb.TelemetryBatch]) -> SqliteStore:
    store = SqliteStore(path)
    store.register_agent(
        apb.Hello(host="h1", instance_id="i1", workloads=[tpb.WorkloadInfo(name=w) for w in WORKLOADS]),
        "peer",
        T0,
    )
    for b in bs:
        store.append_batch("h1", "i1", b, T0)
    return store


def stored_samples(store: SqliteStore) -> int:
    (raw,) = store.db.execute("SELECT COUNT(*) FROM samples").fetchone()
    (folded,) = store.db.execute("SELECT COALESCE(SUM(samples), 0) FROM steps").fetchone()
    return int(raw) + int(folded)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[SqliteStore, SqliteStore, int]:
    """The same telemetry in two stores; the second compacted up to 6 h before the end, in chunks that end
    inside steps."""
    tmp = tmp_path_factory.mktemp("compaction")
    bs = batches()
    raw, compacted = filled(tmp / "raw.db", bs), filled(tmp / "compacted.db", bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    before = stored_samples(compacted)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sqlite_store, "COMPACT_CHUNK_ROWS", 37)
        folded = compacted.compact(last - 6 * 3600_000 + 123_456, STEP_MS)
    cutoff = (last - 6 * 3600_000 + 123_456) // STEP_MS * STEP_MS
    assert folded == sum(1 for b in bs for s in b.samples if s.end_unix_ms <= cutoff)
    assert stored_samples(compacted) == before, "every sample is in samples or in a step, once"
    (left,) = compacted.db.execute("SELECT COUNT(*) FROM samples WHERE end_ms <= ?", (cutoff,)).fetchone()
    assert left == 0
    return raw, compacted, last


def test_the_forecasters_steps_are_unchanged_at_its_step_and_at_multiples(
    stores: tuple[SqliteStore, SqliteStore, int],
) -> None:
    raw, compacted, _ = stores
    for step_ms in (STEP_MS, 3 * STEP_MS):
        want, want_seqs = raw.step_aggregates(0, step_ms)
        got, got_seqs = compacted.step_aggregates(0, step_ms)
        assert got_seqs == want_seqs and sorted(got) == sorted(want)
        for key, w in want.items():
            np.testing.assert_array_equal(got[key].steps, w.steps)
            np.testing.assert_array_equal(got[key].counts, w.counts)
            np.testing.assert_allclose(got[key].values, w.values, rtol=1e-12)


def test_training_series_and_the_restarted_forecast_are_unchanged(
    stores: tuple[SqliteStore, SqliteStore, int],
) -> None:
    raw, compacted, last = stores
    assert (
        len(compacted.resource_series()[("h1", "web")]["end_ms"])
        < len(raw.resource_series()[("h1", "web")]["end_ms"]) / 2
    ), "compacted history is read as steps, not samples"
    for step_s in (300, 600):
        want = series_from_store(raw.resource_series(), step_s)
        got = series_from_store(compacted.resource_series(), step_s)
        assert [s.name for s in got] == [s.name for s in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.timestamps, w.timestamps)
            np.testing.assert_allclose(g.values, w.values, rtol=1e-12)
    engine = PredictionEngine(None)
    b_raw = history_from_store(raw, last, engine.step_seconds, engine.history_steps)
    b_comp = history_from_store(compacted, last, engine.step_seconds, engine.history_steps)
    np.testing.assert_allclose(b_comp.values, b_raw.values, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(
        engine.forecast(b_comp).curves, engine.forecast(b_raw).curves, rtol=1e-6, equal_nan=True
    )


def test_the_champion_challenger_backtest_is_unchanged(stores: tuple[SqliteStore, SqliteStore, int]) -> None:
    raw, compacted, last = stores
    engine = PredictionEngine(None)
    # what the scaling loop reads for a challenger; on a step's edge (with a bound inside a folded step, the
    # step is left out, where the samples would give its part after the bound)
    since_ms = (last - 24 * 3600_000) // STEP_MS * STEP_MS
    want = series_from_store(raw.resource_series(since_ms=since_ms), engine.step_seconds)
    got = series_from_store(compacted.resource_series(since_ms=since_ms), engine.step_seconds)
    since = {s.name: since_ms / 1000 for s in want}
    loss = recent_loss(engine.forecaster, want, since)
    assert math.isfinite(loss)
    assert recent_loss(engine.forecaster, got, since) == pytest.approx(loss, rel=1e-9)


def test_a_late_sample_for_a_folded_step_merges_into_it(tmp_path: Path) -> None:
    bs = batches()[:400]
    raw, compacted = filled(tmp_path / "raw.db", bs), filled(tmp_path / "c.db", bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    compacted.compact(last, STEP_MS)
    rng = np.random.default_rng(1)
    old_step_end = (T0 // STEP_MS + 10) * STEP_MS
    late = apb.TelemetryBatch(seq=401, samples=[sample("web", old_step_end - 1000, 7, rng)])
    for s in (raw, compacted):
        s.append_batch("h1", "i1", late, T0)
    compacted.compact(last, STEP_MS)
    (left,) = compacted.db.execute("SELECT COUNT(*) FROM samples").fetchone()
    assert left == sum(1 for b in bs for s in b.samples if s.end_unix_ms > last // STEP_MS * STEP_MS)
    want, _ = raw.step_aggregates(0, STEP_MS)
    got, _ = compacted.step_aggregates(0, STEP_MS)
    i = int(np.searchsorted(want[("h1", "web")].steps, old_step_end // STEP_MS))
    assert got[("h1", "web")].counts[i] == want[("h1", "web")].counts[i]
    np.testing.assert_allclose(got[("h1", "web")].values, want[("h1", "web")].values, rtol=1e-12)


def test_retention_deletes_old_steps_and_samples_and_keeps_the_rest(tmp_path: Path) -> None:
    bs = batches()[:1200]  # 10 h
    store = filled(tmp_path / "c.db", bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    cutoff = (last - 2 * 3600_000) // STEP_MS * STEP_MS
    store.compact(last - 2 * 3600_000, STEP_MS)
    bound = last - 5 * 3600_000
    store.prune(bound)
    web = [s.end_unix_ms for b in bs for s in b.samples if s.workload == "web"]
    cols = store.resource_series()[("h1", "web")]
    assert min(cols["end_ms"]) >= bound
    kept_steps = sum(w for e, w in zip(cols["end_ms"], cols["weight"], strict=True) if w > 1 or e <= cutoff)
    assert kept_steps == sum(1 for e in web if -(-e // STEP_MS) * STEP_MS >= bound and e <= cutoff)
    assert len(store.samples("h1", "web", limit=10_000)) == sum(1 for e in web if e > cutoff)


def test_raw_hours_beyond_retention_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        build(StoreConfig, {"retention_hours": 24, "raw_hours": 48}, "controller.toml", "store")
    assert "store.raw_hours" in str(e.value) and "retention_hours (24)" in str(e.value)


def test_a_store_from_before_compaction_opens_and_compacts(tmp_path: Path) -> None:
    store = filled(tmp_path / "c.db", batches()[:100])
    store.db.execute("DROP TABLE steps")
    store.db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store.close()
    again = SqliteStore(tmp_path / "c.db")
    assert again.compact(T0 + 3600_000, STEP_MS) > 0
    assert again.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("4",)
