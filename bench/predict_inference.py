"""Prediction Engine inference time: one batched forecast for 1,000 and 10,000 workloads.

Each workload has three resources (CPU, memory, I/O) with a day of 5-minute history and request-rate
signals, so 10,000 workloads are 30,000 series in one onnxruntime call. Prints, per size, the median over
repeated cycles of: featurisation, the onnxruntime call alone, and the whole `PredictionEngine.forecast`
in steady state (periods cached, as the engine refreshes them hourly) and cold (every period detected).

    .venv/bin/python bench/predict_inference.py [--model PATH] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from controller.predict.engine import PredictionEngine
from controller.predict.features import build_features, detect_periods
from controller.predict.model import DEFAULT_MODEL, OnnxForecaster
from controller.predict.series import SeriesBatch
from controller.telemetry_schema import SIGNALS


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


def measure(engine: PredictionEngine, n: int, repeat: int) -> str:
    model = engine.forecaster
    assert isinstance(model, OnnxForecaster)
    step, steps = engine.step_seconds, engine.history_steps
    batch = synthetic_batch(n, steps, step)
    hist = batch.values.reshape(n * 3, steps)
    ts = np.repeat(batch.origin_ts, 3)
    sig = None if batch.signals is None else np.repeat(batch.signals[:, :, -model.spec.window :], 3, axis=0)
    periods = detect_periods(hist, model.spec)
    feats = build_features(hist, ts, step, model.spec, sig, periods)
    t_feat = timed(lambda: build_features(hist, ts, step, model.spec, sig, periods), repeat)
    t_run = timed(lambda: model.run(feats.x), repeat)
    engine.forecast(batch)  # fills the period cache: steady state from here
    t_fc = timed(lambda: engine.forecast(batch), repeat)

    def cold() -> None:
        engine._period_cache = None
        engine.forecast(batch)

    t_cold = timed(cold, max(3, repeat // 2))
    return f"{n:>10}{n * 3:>8}{t_feat:>11.1f}{t_run:>11.1f}{t_fc:>11.1f}{t_cold:>9.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--repeat", type=int, default=7)
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
        f"numpy {np.__version__}, onnxruntime {ort_version()}"
    )
    print()
    print(f"{'workloads':>10}{'series':>8}{'features':>11}{'onnx run':>11}{'forecast':>11}{'cold':>9}  (ms)")
    for n in (1000, 10000):
        print(measure(engine, n, args.repeat), flush=True)
    print()
    print("features: numpy featurisation (periods cached); onnx run: the one batched onnxruntime call;")
    print(
        "forecast: PredictionEngine.forecast, the whole cycle (periods cached, as the engine keeps them for"
    )
    print("an hour); cold: the same with every series' period detected again.")


def ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


if __name__ == "__main__":
    main()
