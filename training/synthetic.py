"""Synthetic training series: shapes of demand the real traces have too few of.

A model trained on a dozen traces has seen a dozen behaviours. Held-out evaluation showed what that costs:
smooth series (a daily cycle, a slow drift) were forecast worse than "same as now", because every training
trace but one was noisy and the network learnt to expect mean reversion. These generators cover the
spectrum deliberately: smooth cycles, random walks, autoregressive noise, periodic jobs, regime switches,
bursts, at 5- and 30-minute steps. They are seeded, so a training run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from training.traces import Trace

F64 = npt.NDArray[np.float64]
DAY = 86400
_START = 1_400_000_000  # 2014-05-13: an arbitrary, fixed origin


def _daily(t: F64, rng: np.random.Generator) -> F64:
    phase = rng.uniform(0, 2 * math.pi)
    base = np.sin(2 * math.pi * t / DAY + phase)
    # a sharper, asymmetric day: peaks narrower than troughs, as in request traffic
    shape = rng.uniform(0.0, 0.6)
    weekly = 1 + rng.uniform(0, 0.3) * np.sin(2 * math.pi * t / (7 * DAY) + rng.uniform(0, 6.3))
    return np.asarray((base + shape * base**2) * weekly)


def generate(kind: str, steps: int, step_seconds: int, rng: np.random.Generator) -> F64:
    t = np.arange(steps, dtype=np.float64) * step_seconds
    level = float(10 ** rng.uniform(-1, 6))
    noise = rng.normal(size=steps)
    if kind == "daily":
        amp = rng.uniform(0.2, 0.8)
        v = 1 + amp * _daily(t, rng) + rng.uniform(0.005, 0.05) * noise
    elif kind == "random_walk":
        v = 1 + np.cumsum(rng.uniform(0.002, 0.02) * noise)
        v = v - min(0.0, float(v.min())) + 0.1
    elif kind == "ar1":
        phi = rng.uniform(0.5, 0.98)
        e = rng.uniform(0.01, 0.1) * noise
        v = np.empty(steps)
        v[0] = 0.0
        for i in range(1, steps):
            v[i] = phi * v[i - 1] + e[i]
        v = 1 + v
    elif kind == "periodic":
        # a job every `period` steps (one or two spikes per run, some runs skipped) on a noisy base
        period = int(rng.integers(3, 30))
        pattern = 0.2 * rng.gamma(2.0, 1.0, size=period)
        height = rng.uniform(0.5, 30)
        for _ in range(int(rng.integers(1, 3))):
            pattern[rng.integers(period)] += height
        runs = np.repeat(rng.random(steps // period + 1) < rng.uniform(0.8, 1.0), period)[:steps]
        base = np.resize(pattern, steps)
        v = 1 + np.where(runs, base, np.minimum(base, 0.5)) + rng.uniform(0.01, 0.1) * noise
    elif kind == "regimes":
        hi = rng.uniform(1.5, 4)
        switch = rng.random(steps) < rng.uniform(0.002, 0.02)
        state = np.cumsum(switch) % 2
        v = np.where(state == 1, hi, 1.0) * (1 + rng.uniform(0.01, 0.08) * noise)
    elif kind == "bursts":
        on = rng.random(steps) < rng.uniform(0.005, 0.05)
        length = int(rng.integers(1, 8))
        mask = np.convolve(on.astype(float), np.ones(length))[:steps] > 0
        v = 1 + mask * rng.uniform(2, 50) * (1 + 0.1 * noise) + rng.uniform(0.0, 0.1) * np.abs(noise)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    return np.asarray(np.maximum(v, 0.0) * level)


KINDS = ("daily", "random_walk", "ar1", "periodic", "regimes", "bursts")


def synthetic_traces(count: int, seed: int = 0, days: float = 14.0) -> list[Trace]:
    """`count` series cycling through the kinds, mostly at 5-minute steps, every third at 30 minutes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        step = 1800 if i % 3 == 2 else 300
        steps = int(days * DAY / step)
        v = generate(kind, steps, step, rng)
        ts = _START + np.arange(steps, dtype=np.int64) * step
        out.append(Trace(f"synthetic_{i:02d}_{kind}", ts, v))
    return out
