"""Prediction Engine: the scaling cycle's forecast for 1,000 and 10,000 workloads, history read included.

Each workload has three resources (CPU, memory, I/O) with a day of 5-minute history and request-rate
signals, kept where production keeps them: the controller's in-memory `StepHistory`, fed by ingest and seeded
from the store at start. 10,000 workloads are 30,000 series in one onnxruntime call. Prints, per size, the
median over repeated cycles of:

- history: cutting the day of every workload out of the `StepHistory` (the cycle's read);
- features: numpy featurisation on one thread and on the engine's threads (their ratio);
- onnx run: the onnxruntime call alone;
- cycle: `controller.scaling.loop.forecast_from`, what the controller's worker runs each step (history cut
  and `PredictionEngine.forecast`, periods cached as the engine keeps them for an hour); cold: the same with
  every period detected again (once an hour per series).

Then what feeding and seeding the history cost: ingest per sample (`StepHistory.add_batch`), and a
restart's seed from SQLite (`Store.step_aggregates` + `StepHistory.load`) for a day at a 10 s interval.

    .venv/bin/python bench/predict_inference.py [--model PATH] [--repeat N] [--seed-workloads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import controller.predict.features as features
from controller import telemetry_schema as schema
from controller.predict.engine import PredictionEngine
from controller.predict.features import build_features, detect_periods
from controller.predict.model import DEFAULT_MODEL, OnnxForecaster
from controller.predict.series import SeriesBatch
from controller.predict.step_history import MOVE_AHEAD_STEPS, SPARE_STEPS, StepHistory
from controller.scaling.loop import forecast_from
from controller.store.base import StepAggregate
from controller.store.sqlite import SqliteStore
from controller.telemetry_schema import SIGNALS
from shadowplane.v1 import agent_pb2 as apb


def synthetic_batch(n: int, steps: int, step: int, seed: int = 0) -> SeriesBatch:
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    daily = np.sin(2 * np.pi * t / (86400 / step))
    scale = 10 ** rng.uniform(-1, 6, size=(n, 3, 1))
    walk = np.cumsum(rng.normal(0, 0.02, size=(n, 3, steps)), axis=2)
    values = scale * np.abs(1 + 0.3 * daily + walk + rng.normal(0, 0.05, size=(n, 3, steps)))
    signals = 1000 * np.abs(1 + 0.3 * daily + rng.normal(0, 0.1, size=(n, len(SIGNALS), steps)))
    return SeriesBatch(
        keys=tuple(f"host-{i // 20}/wl-{i}" for i in range(n)),
        origin_ts=np.full(n, 1_700_000_000.0),
        step_seconds=step,
        values=values,
        signals=signals,
    )


def timed(fn: object, repeat: int) -> float:
    assert callable(fn)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


SAMPLE_S = 10  # the agent's default interval: samples per step = step / SAMPLE_S


def history_of(
    batch: SeriesBatch, engine: PredictionEngine, last_step: int, first: tuple[str, ...] = ()
) -> StepHistory:
    """A `StepHistory` holding the batch as its steps ending with `last_step`, loaded as the controller's
    seed loads it (per-step aggregates; the workloads `first` in the first rows)."""
    step = engine.step_seconds
    h = StepHistory(step, engine.history_steps, engine.forecaster.spec.window)
    steps = batch.values.shape[2]
    ids = np.arange(last_step - steps + 1, last_step + 1, dtype=np.int64)
    counts = np.full(steps, step // SAMPLE_S, dtype=np.int64)
    res = [i for i, x in enumerate(schema.SERIES) if x.kind == "resource"]
    sig = [i for i, x in enumerate(schema.SERIES) if x.kind == "signal"]
    aggs = {}
    for i, key in enumerate(batch.keys):
        vals = np.empty((len(schema.SERIES), steps))
        vals[res] = batch.values[i]
        assert batch.signals is not None
        vals[sig] = batch.signals[i]
        host, _, workload = key.partition("/")
        aggs[(host, workload)] = StepAggregate(ids, counts, vals)
    h.begin_seed()
    h.load(aggs, (last_step + 1) * step * 1000, first)
    h.end_seed({})
    return h


def measure(engine: PredictionEngine, n: int, repeat: int) -> str:
    model = engine.forecaster
    assert isinstance(model, OnnxForecaster)
    step, steps = engine.step_seconds, engine.history_steps
    # As in production: every primary's workload (whose demand is forecast) and as many others (its
    # shadows' workloads, which report too); the controller seeds the primaries into the first rows.
    fleet = synthetic_batch(2 * n, steps, step)
    last = 1_700_000_100 // step
    keys = sorted(fleet.keys[::2])
    others = sorted(fleet.keys[1::2])
    history = history_of(fleet, engine, last, tuple(keys))
    until_ms = last * step * 1000
    t_hist = timed(lambda: history.batch(until_ms, keys), repeat)
    # after a failover the demand of those services comes from their shadows, rows that are not the first
    t_copy = timed(lambda: history.batch(until_ms, others), repeat)
    cut = history.batch(until_ms, keys)
    assert not np.isnan(cut.values).any() and cut.values.shape == (n, 3, steps)
    hist = cut.values.reshape(n * 3, steps)
    ts = np.repeat(cut.origin_ts, 3)
    assert cut.signals is not None
    sig = cut.signals[:, :, -model.spec.window :]  # one row per workload, as the engine passes them
    periods = detect_periods(hist, model.spec)
    threads = features.FEATURE_THREADS
    feats = build_features(hist, ts, step, model.spec, sig, periods, 3)
    features.FEATURE_THREADS = 1
    t_feat1 = timed(lambda: build_features(hist, ts, step, model.spec, sig, periods, 3), repeat)
    features.FEATURE_THREADS = threads
    t_feat = timed(lambda: build_features(hist, ts, step, model.spec, sig, periods, 3), repeat)
    t_run = timed(lambda: model.run(feats.x), repeat)
    forecast_from(history, engine, until_ms, keys)  # fills the period cache: steady state from here
    t_fc = timed(lambda: forecast_from(history, engine, until_ms, keys), repeat)

    def cold() -> None:
        engine._period_cache = None
        forecast_from(history, engine, until_ms, keys)

    t_cold = timed(cold, max(3, repeat // 2))
    # the window moves once every SPARE_STEPS steps: the cycle does it in the worker, ingest holding its
    # batches meanwhile (what the controller runs when `needs_move`)
    w = history.resources
    assert w.base is not None
    due_ms = (w.base + w.columns - MOVE_AHEAD_STEPS) * step * 1000
    assert history.needs_move(due_ms)
    history.hold()
    t0 = time.perf_counter()
    history.move_ahead(due_ms)
    t_move = (time.perf_counter() - t0) * 1000
    history.release()
    return (
        f"{n:>10}{n * 3:>8}{t_hist:>9.1f}{t_copy:>7.1f}{t_feat1:>10.1f}{t_feat:>9.1f}{t_feat / t_feat1:>7.2f}"
        f"{t_run:>10.1f}{t_fc:>9.1f}{t_cold:>8.1f}{t_move:>8.1f}"
    )


def agent_batch(seq: int, end_ms: int, workloads: int = 3) -> apb.TelemetryBatch:
    """One agent's batch: a sample per workload, with syscalls and resources as the agent fills them."""
    b = apb.TelemetryBatch(seq=seq)
    for w in range(workloads):
        s = b.samples.add(workload=f"w{w}", start_unix_ms=end_ms - SAMPLE_S * 1000, end_unix_ms=end_ms)
        s.resources.cpu_seconds, s.resources.memory_bytes = 3.2 + w, 1 << 30
        s.resources.io_read_bytes, s.resources.io_write_bytes = 10**6, 10**5
        s.syscalls.total = 50_000
        s.syscalls.by_name["accept4"] = 100
    return b


def ingest_cost(engine: PredictionEngine, hosts: int = 2000) -> float:
    """Microseconds per sample that `StepHistory.add_batch` adds to ingest (a 3-workload batch per host)."""
    h = StepHistory(engine.step_seconds, engine.history_steps, engine.forecaster.spec.window)
    t0_ms = 1_700_000_000_000
    batches = [agent_batch(i + 1, t0_ms + (i // hosts) * SAMPLE_S * 1000) for i in range(hosts * 5)]
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        h.add_batch(f"host-{i % hosts}", "i1", b, b.samples[0].end_unix_ms)
    return (time.perf_counter() - t0) / (len(batches) * 3) * 1e6


def seed_cost(engine: PredictionEngine, workloads: int) -> tuple[int, float, float]:
    """A restart: (stored samples, seconds to aggregate them in SQLite, seconds to load the history)."""
    step = engine.step_seconds
    h = StepHistory(step, engine.history_steps, engine.forecaster.spec.window)
    now_ms = 1_700_000_000_000
    since = h.seed_since_ms(now_ms)
    per_workload = (now_ms - since) // (SAMPLE_S * 1000)
    with tempfile.TemporaryDirectory() as d:
        store = SqliteStore(Path(d) / "c.db")
        hosts = max(1, workloads // 3)
        for host in range(hosts):
            store.register_agent(apb.Hello(host=f"h{host}", instance_id="i1"), "peer", now_ms)
        rng = np.random.default_rng(0)
        seq = 0
        for k in range(per_workload):
            end = since + (k + 1) * SAMPLE_S * 1000
            for host in range(hosts):
                b = agent_batch(seq := seq + 1, end, workloads=3 if workloads >= 3 else workloads)
                b.samples[0].resources.cpu_seconds = float(rng.uniform(0, 40))
                store.append_batch(f"h{host}", "i1", b, end)
        rows = seq * (3 if workloads >= 3 else workloads)
        t0 = time.perf_counter()
        aggregates, seqs = store.step_aggregates(since, h.step_ms)
        t1 = time.perf_counter()
        h.begin_seed()
        h.load(aggregates, now_ms)
        h.end_seed(seqs)
        t2 = time.perf_counter()
        store.close()
    return rows, t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed-workloads", type=int, default=150, help="workloads in the restart's store")
    args = ap.parse_args()
    engine = PredictionEngine(args.model)
    model = engine.forecaster
    assert isinstance(model, OnnxForecaster), f"model did not load: {engine.reason}"
    print(
        f"model {model.info.version}: {model.spec.n_features} features -> {model.horizon} steps x "
        f"{len(model.quantiles)} quantiles; history {engine.history_steps} steps of {engine.step_seconds} s"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"numpy {np.__version__}, onnxruntime {ort_version()}; featurisation threads "
        f"{features.FEATURE_THREADS}, onnxruntime threads {engine.threads or 'all cores'}"
    )
    print()
    print(
        f"{'workloads':>10}{'series':>8}{'history':>9}{'copy':>7}{'feat 1t':>10}{'feat':>9}{'ratio':>7}"
        f"{'onnx run':>10}{'cycle':>9}{'cold':>8}{'move':>8}  (ms)"
    )
    for n in (1000, 10000):
        print(measure(engine, n, args.repeat), flush=True)
    print()
    print("history: the day of every forecast workload cut from the in-memory StepHistory, which holds")
    print("as many other workloads (the shadows'): a view of its first rows; copy: the same for rows")
    print("scattered among the others (each service's demand moved to its shadow by a failover);")
    print(
        f"feat 1t / feat: featurisation on 1 thread / on {features.FEATURE_THREADS} (ratio = feat / feat 1t);"
    )
    print("onnx run: the one batched onnxruntime call; cycle: forecast_from, what the controller's worker")
    print("runs each step (history cut + PredictionEngine.forecast, periods cached as the engine keeps")
    print("them for an hour); cold: the same with every series' period detected again; move: the history's")
    hours = SPARE_STEPS * engine.step_seconds / 3600
    print(
        f"window (all 2 x workloads) moving on by {SPARE_STEPS} steps, once every {hours:g} h, in the cycle's"
    )
    print("worker (ingest holds its batches meanwhile, the event loop does not wait).")
    print()
    per = sum(
        w.values[0].nbytes + w.counts[0].nbytes
        for w in (lambda h: (h.resources, h.signals))(
            history_of(synthetic_batch(1, engine.history_steps, engine.step_seconds), engine, 10**7)
        )
    )
    print(f"memory: {per / 1024:.1f} KiB per workload ({per * 10_000 / 2**20:.0f} MiB for 10,000 workloads)")
    us = ingest_cost(engine)
    print(
        f"ingest: StepHistory.add_batch {us:.1f} us per sample (2,000 hosts x 3 workloads every 10 s: "
        f"{us * 600 / 1e4:.2f} % of a core)"
    )
    rows, t_agg, t_load = seed_cost(engine, args.seed_workloads)
    per_w = (t_agg + t_load) / args.seed_workloads
    print(
        f"restart seed: {args.seed_workloads} workloads x a day at 10 s = {rows:,} stored samples: SQLite "
        f"aggregation {t_agg:.2f} s ({rows / t_agg / 1e6:.2f} M samples/s), load {t_load * 1000:.0f} ms; "
        f"at 10,000 workloads about {per_w * 10000:.0f} s, off the event loop"
    )


def ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


if __name__ == "__main__":
    main()
