"""The controller's in-memory history on the forecast's step: what it forecasts from every cycle.

It must hold exactly what resampling the stored samples gives (`features.resample`, as training and the
backtest see history), whether fed sample by sample as telemetry arrives, seeded from the store after a
restart, or both at once (batches arriving while the seed is read count once).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from controller import telemetry_schema as schema
from controller.config import ControllerConfig, ServiceConfig, StoreConfig
from controller.ingest import AgentStreamService
from controller.predict.series import resample_workload
from controller.predict.step_history import SPARE_STEPS, StepHistory, history_from_store
from controller.registry import AgentRegistry, AgentSession
from controller.store.sqlite import SqliteStore
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

T0 = 1_700_000_040_000  # ms, a multiple of the step
STEP_S = 60.0
STEPS = 40
SIG_STEPS = 6
NOW = T0 + 10**8  # the controller's clock: after every sample


def sample(workload: str, end_ms: int, rng: np.random.Generator) -> tpb.WorkloadSample:
    dur = int(rng.integers(5_000, 15_000))
    return tpb.WorkloadSample(
        workload=workload,
        cgroup=f"/{workload}",
        start_unix_ms=end_ms - dur,
        end_unix_ms=end_ms,
        resources=tpb.Resources(
            cpu_seconds=float(rng.uniform(0, 4)) * dur / 1000,
            memory_bytes=int(rng.integers(1 << 20, 1 << 30)),
            io_read_bytes=int(rng.integers(0, 10**7)),
        ),
        syscalls=tpb.SyscallProfile(
            total=int(rng.integers(0, 10**5)), by_name={"accept4": int(rng.integers(0, 99))}
        ),
    )


def batches(n: int, seed: int = 0, workloads: int = 3) -> list[apb.TelemetryBatch]:
    """n batches of one agent: irregular sample times, a workload that stops reporting for a while, one
    that starts late, and now and then a sample that arrives a step late."""
    rng = np.random.default_rng(seed)
    out = []
    t = T0
    for i in range(n):
        t += int(rng.integers(4_000, 25_000))
        samples = []
        for w in range(workloads):
            if w == 1 and 60 < i < 90:
                continue  # away: those steps stay unknown
            if w == 2 and i < 40:
                continue  # a workload that starts later
            end = t - (70_000 if rng.random() < 0.05 else 0)  # late: lands in an older step
            samples.append(sample(f"w{w}", end, rng))
        out.append(apb.TelemetryBatch(seq=i + 1, samples=samples))
    return out


def expected(bs: list[apb.TelemetryBatch], until_ms: int, steps: int, names: tuple[str, ...]) -> np.ndarray:
    """What resampling every stored sample gives: (workloads, series, steps) ending at until's step."""
    cols: dict[str, dict[str, list[float]]] = {}
    for b in bs:
        for s in b.samples:
            c = cols.setdefault(f"h/{s.workload}", {k: [] for k in ("end_ms", *schema.COLUMNS)})
            c["end_ms"].append(float(s.end_unix_ms))
            for k, v in zip(schema.COLUMNS, schema.values(s), strict=True):
                c[k].append(float(v))
    out = []
    for key in sorted(cols):
        _, grids = resample_workload(cols[key], STEP_S, until_s=until_ms / 1000)
        rows = []
        for name in names:
            v = np.full(steps, np.nan)
            g = grids[name][-steps:]
            v[steps - len(g) :] = g
            rows.append(v)
        out.append(rows)
    return np.asarray(out)


def fed(bs: list[apb.TelemetryBatch]) -> StepHistory:
    h = StepHistory(STEP_S, STEPS, SIG_STEPS)
    for b in bs:
        h.add_batch("h", "i1", b, NOW)
    return h


def assert_same(h: StepHistory, bs: list[apb.TelemetryBatch], until_ms: int) -> None:
    got = h.batch(until_ms)
    assert got.keys == ("h/w0", "h/w1", "h/w2")
    np.testing.assert_allclose(got.values, expected(bs, until_ms, STEPS, schema.RESOURCES), rtol=1e-12)
    assert got.signals is not None
    np.testing.assert_allclose(got.signals, expected(bs, until_ms, SIG_STEPS, schema.SIGNALS), rtol=1e-12)
    assert (got.origin_ts == -(-until_ms // 60_000) * 60.0).all()


def test_fed_as_telemetry_arrives_it_holds_what_resampling_the_samples_gives() -> None:
    bs = batches(200)
    h = fed(bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    for until in (last, last - 60_000, last - 17 * 60_000):  # the open step, the last complete, older
        assert_same(h, bs, until)
    got = h.batch(last)
    away = got.values[1, 0]
    assert np.isnan(away).sum() >= 5, "the steps w1 did not report stay unknown"
    assert not np.isnan(got.values[0, :, -1]).any()


def test_a_workload_back_after_longer_than_the_window_shows_only_what_it_reported() -> None:
    rng = np.random.default_rng(1)
    h = StepHistory(STEP_S, STEPS, SIG_STEPS)
    h.add_batch("h", "i1", apb.TelemetryBatch(seq=1, samples=[sample("w0", T0 + 30_000, rng)]), NOW)
    back = T0 + 30_000 + (STEPS + SPARE_STEPS + 5) * 60_000  # the window has moved past the first step
    h.add_batch("h", "i1", apb.TelemetryBatch(seq=2, samples=[sample("w0", back, rng)]), NOW)
    v = h.batch(back).values[0, 0]
    assert not np.isnan(v[-1]) and np.isnan(v[:-1]).all()
    assert np.isnan(h.batch(T0 + 60_000).values).all(), "a cut older than the window is unknown"
    # a sample of the old step arriving now (an agent's backlog) is older than the window: nothing changes
    h.add_batch("h", "i1", apb.TelemetryBatch(seq=3, samples=[sample("w0", T0 + 20_000, rng)]), NOW)
    np.testing.assert_array_equal(h.batch(back).values[0, 0], v)


def test_a_sample_from_an_agent_clock_ahead_does_not_move_the_fleet_window() -> None:
    rng = np.random.default_rng(5)
    bs = batches(100, seed=5)
    h = fed(bs)
    now = max(s.end_unix_ms for b in bs for s in b.samples)
    before = h.batch(now).values.copy()
    ahead = apb.TelemetryBatch(seq=101, samples=[sample("w0", now + 3 * 24 * 3600_000, rng)])
    h.add_batch("h", "i1", ahead, now)
    np.testing.assert_array_equal(h.batch(now).values, before)


def test_the_workloads_a_cycle_forecasts_are_cut_without_a_copy_after_a_seed(tmp_path: Path) -> None:
    bs = batches(120, seed=9)
    store = store_with(tmp_path, bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    h = StepHistory(STEP_S, STEPS, SIG_STEPS)
    aggregates, seqs = store.step_aggregates(h.seed_since_ms(last), h.step_ms)
    h.begin_seed()
    h.load(aggregates, last, first=["h/w2", "h/w0"])  # the primaries whose demand sizes shadows
    h.end_seed(seqs)
    cut = h.batch(last, ["h/w2", "h/w0"])
    assert cut.keys == ("h/w2", "h/w0")
    assert np.shares_memory(cut.values, h.resources.values)
    whole = h.batch(last)
    np.testing.assert_array_equal(
        cut.values, whole.values[[whole.keys.index("h/w2"), whole.keys.index("h/w0")]]
    )


def test_the_whole_fleet_is_cut_without_a_copy_and_a_cut_survives_the_window_moving() -> None:
    bs = batches(200, seed=6)
    h = fed(bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    cut = h.batch(last)
    assert np.shares_memory(cut.values, h.resources.values), "a view of the history, not a copy"
    assert not cut.values.flags.writeable
    kept = cut.values.copy()
    rng = np.random.default_rng(7)
    far = last + (SPARE_STEPS + 3) * 60_000
    h.add_batch("h", "i1", apb.TelemetryBatch(seq=999, samples=[sample("w0", far, rng)]), far)
    np.testing.assert_array_equal(cut.values, kept)  # the forecast reading it is not disturbed
    assert h.batch(far).keys == ("h/w0",), "only w0 reported in the last STEPS steps"


def test_many_workloads_grow_the_history() -> None:
    rng = np.random.default_rng(2)
    h = StepHistory(STEP_S, STEPS, SIG_STEPS, capacity=4)
    samples = [sample(f"w{i:03d}", T0 + 10_000, rng) for i in range(150)]
    h.add_batch("h", "i1", apb.TelemetryBatch(seq=1, samples=samples), NOW)
    b = h.batch(T0 + 10_000)
    assert len(b.keys) == 150
    np.testing.assert_allclose(b.values[:, 0, -1], [schema.named("cpu").of(s) for s in samples], rtol=1e-12)
    sub = h.batch(T0 + 10_000, keys=["h/w007", "h/nobody", "h/w003"])
    assert sub.keys == ("h/w003", "h/w007"), "in the order the history first saw them"
    assert sub.values[1, 1, -1] == samples[7].resources.memory_bytes


def store_with(tmp_path: Path, bs: list[apb.TelemetryBatch]) -> SqliteStore:
    store = SqliteStore(tmp_path / "c.db")
    store.register_agent(apb.Hello(host="h", instance_id="i1"), "peer", T0)
    for b in bs:
        assert store.append_batch("h", "i1", b, T0)
    return store


def test_a_restarted_controller_seeded_from_the_store_has_the_same_history(tmp_path: Path) -> None:
    bs = batches(200, seed=3)
    store = store_with(tmp_path, bs)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    restarted = history_from_store(store, last, STEP_S, STEPS, SIG_STEPS)
    live = fed(bs).batch(last)
    assert restarted.keys == live.keys
    np.testing.assert_allclose(restarted.values, live.values, rtol=1e-12)
    np.testing.assert_allclose(restarted.signals, live.signals, rtol=1e-12)  # type: ignore[arg-type]


def test_batches_arriving_while_the_seed_is_read_count_once(tmp_path: Path) -> None:
    """A batch stored before the seed's snapshot is in the seed; one stored after it is not. Both arrive at
    the history while the seed is read: the first must not count twice, the second must not be lost."""
    bs = batches(150, seed=4)
    store = store_with(tmp_path, bs[:120])
    h = StepHistory(STEP_S, STEPS, SIG_STEPS)
    h.begin_seed()
    for b in bs[120:130]:  # stored, then handed to the history: in the snapshot
        assert store.append_batch("h", "i1", b, T0)
        h.add_batch("h", "i1", b, NOW)
    now = max(s.end_unix_ms for b in bs[:130] for s in b.samples)
    aggregates, seqs = store.step_aggregates(h.seed_since_ms(now), h.step_ms)
    assert seqs[("h", "i1")] == 130
    for b in bs[130:]:  # after the snapshot
        assert store.append_batch("h", "i1", b, T0)
        h.add_batch("h", "i1", b, NOW)
    h.seed(aggregates, seqs, NOW)
    for b in bs[150:]:
        h.add_batch("h", "i1", b, NOW)
    last = max(s.end_unix_ms for b in bs for s in b.samples)
    assert_same(h, bs, last)


def test_bad_grids_are_refused_with_the_field() -> None:
    with pytest.raises(ValueError, match="step"):
        StepHistory(0, STEPS, SIG_STEPS)


def test_ingest_hands_each_stored_batch_to_the_history_once(tmp_path: Path) -> None:
    """The agent stream feeds the history only with what the store accepted: a batch the agent resends
    (its acknowledgement was lost) is a duplicate there, and must not count twice here."""
    cfg = ControllerConfig(
        tls=TlsConfig(plaintext=True),
        store=StoreConfig(path=tmp_path / "c.db"),
        service=[ServiceConfig("web", "h", ["s1"], vip="10.0.0.100/24")],
    )
    store = SqliteStore(tmp_path / "c.db")
    hello = apb.Hello(host="h", instance_id="i1", workloads=[tpb.WorkloadInfo(name="w0", cgroup="/w0")])
    store.register_agent(hello, "peer", T0)
    h = StepHistory(STEP_S, STEPS, SIG_STEPS)
    ingest = AgentStreamService(
        cfg, store, AgentRegistry(), clock=lambda: NOW, on_telemetry=lambda *a: h.add_batch(*a)
    )
    session = AgentSession("h", "i1", "peer", hello, T0, T0)
    rng = np.random.default_rng(8)
    bs = [
        apb.TelemetryBatch(seq=i + 1, samples=[sample("w0", T0 + 10_000 * (i + 1), rng)]) for i in range(12)
    ]
    for b in (*bs, bs[5], bs[11]):  # two resent
        reply = ingest._handle(session, apb.AgentMessage(telemetry=b))
        assert reply is not None and reply.WhichOneof("body") == "ack", reply
    last = bs[-1].samples[0].end_unix_ms
    np.testing.assert_allclose(
        h.batch(last).values[0], expected(bs, last, STEPS, schema.RESOURCES)[0], rtol=1e-12
    )


def test_the_cycle_moves_the_window_in_another_thread_while_ingest_holds_its_batches() -> None:
    """The window's move copies the whole fleet's history: the scaling cycle does it in its worker before
    it is due, with ingest's batches held meanwhile and added after; nothing is lost or counted twice."""
    bs = batches(900, seed=10)
    h = StepHistory(STEP_S, STEPS, SIG_STEPS)
    i = 0
    while True:
        now = max(x.end_unix_ms for x in bs[i].samples)  # the controller's clock as the batch arrives
        h.add_batch("h", "i1", bs[i], now)
        i += 1
        if h.needs_move(now):
            break
    base = h.resources.base
    h.hold()
    for b in bs[i : i + 5]:  # they arrive while the worker copies
        h.add_batch("h", "i1", b, max(x.end_unix_ms for x in b.samples))
    mover = threading.Thread(target=h.move_ahead, args=(now,))
    mover.start()
    mover.join()
    assert h.resources.base is not None and base is not None and h.resources.base > base
    h.release()
    assert not h.needs_move(now)
    last = max(s.end_unix_ms for b in bs[: i + 5] for s in b.samples)
    assert_same(h, bs[: i + 5], last)
