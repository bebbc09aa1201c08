"""Feature building: pure, vectorised numpy, the same code for training, serving and the backtest.

A row is one series (one resource of one workload) at one forecast origin: its last `history_steps` values,
oldest first, with NaN where nothing is known yet (a new workload). Everything is measured in *steps*, and
the day is `86400 / step_seconds` of them, so one model serves any sampling step.

Each row is normalised by its own level (the median of its last three values) and scale (the mean
step-to-step change over the last `tail_window` steps, floored), so one model serves CPU cores, bytes and
request rates alike: the model predicts `(value - level) / scale` and `denormalise` turns that back into
the series' own units. Scaling by the step-to-step change (not the spread) makes "one unit" mean "a typical
move" for every series, which is what a forecast's width is about.

Many workloads repeat on a short cycle (cron jobs, batch pollers: every 40 or 60 minutes in the NAB traces);
`detect_periods` finds each row's best repeating lag, and the model sees the values one, two, ... cycles
back at each horizon step. Periods change slowly, so the engine may compute them less often than it
forecasts and pass them in.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from controller.telemetry_schema import SIGNALS

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
DAY = 86400
# 1970-01-01 was a Thursday: shift so that Monday is day 0.
_EPOCH_WEEKDAY = 3

_TAIL_QUANTILES = (0.01, 0.1, 0.9, 0.99)
CHUNK_ROWS = 2048
# Chunks of a big batch are featurised on this many threads at once: numpy releases the GIL inside each
# operation, so on a 2-core host a 10,000-workload batch takes about 0.6 of the time it takes on one
# (bench/predict_inference.py). The pool's threads are started by the first thread that featurises a big
# batch and inherit its priority (the controller's niced store worker).
FEATURE_THREADS = min(2, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
T = TypeVar("T")


def _chunks(fn: Callable[[int], T], rows: int) -> list[T]:
    """`fn(start)` for each chunk of CHUNK_ROWS rows, in order, on up to FEATURE_THREADS threads."""
    starts = range(0, rows, CHUNK_ROWS)
    if FEATURE_THREADS < 2 or len(starts) < 2:
        return [fn(a) for a in starts]
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(FEATURE_THREADS, thread_name_prefix="features")
    return list(_pool.map(fn, starts))


@dataclass(frozen=True)
class FeatureSpec:
    """What the model sees. Stored in the model file so serving builds exactly what training built."""

    window: int = 24  # recent steps fed as they are (at least 3)
    horizon: int = 6  # steps forecast
    season_pad: int = 2  # yesterday's values from `1 - pad` to `horizon + pad` steps past the origin
    lag_max: int = 36  # longest repeating cycle looked for, in steps
    lag_fit: int = 48  # steps over which candidate cycles are compared
    lag_cycles: int = 6  # cycles back averaged for the periodic features
    tail_window: int = 72  # steps whose step-to-step changes give the tail features
    signals: tuple[str, ...] = SIGNALS  # request-rate series the agent captures, optional per row
    signal_window: int = 3  # latest steps of each signal
    clip: float = 20.0  # normalised inputs beyond +-clip are squashed logarithmically

    def season_steps(self, step_seconds: float) -> int:
        return max(1, round(DAY / step_seconds))

    def history_steps(self, step_seconds: float) -> int:
        """How many past values a row needs to have every feature (fewer work, with less information)."""
        return max(
            self.window,
            self.season_steps(step_seconds) + self.season_pad,
            self.lag_fit + self.lag_max,
            self.lag_max * self.lag_cycles,
            self.tail_window + 1,
        )

    def names(self) -> list[str]:
        n = [f"recent[-{self.window - 1 - i}]" for i in range(self.window)]
        n += [f"day_ago[{h:+d}]" for h in self.season_offsets()]
        n += ["day_known", "day_max", "tail_max", "tail_min", "tail_mean", "log_recent_std", "log_tail_std"]
        n += [f"step_change_q{q:g}" for q in _TAIL_QUANTILES]
        for kind in ("cycle_ago", "cycle_mean", "cycle_std", "cycle_trusted"):
            n += [f"{kind}[+{h}]" for h in range(1, self.horizon + 1)]
        n += ["cycle_known", "cycle_length", "cycle_log_error"]
        n += ["tod_sin", "tod_cos", "dow_sin", "dow_cos"]
        for s in self.signals:
            n += [f"{s}[-{self.signal_window - 1 - i}]" for i in range(self.signal_window)]
            n += [f"{s}_known"]
        return n

    @property
    def n_features(self) -> int:
        return len(self.names())

    def season_offsets(self) -> range:
        return range(1 - self.season_pad, self.horizon + self.season_pad + 1)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["signals"] = list(self.signals)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FeatureSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown feature settings {sorted(unknown)}")
        kw = dict(d)
        if "signals" in kw:
            kw["signals"] = tuple(str(s) for s in kw["signals"])  # type: ignore[attr-defined]
        return cls(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Features:
    x: F32  # (rows, n_features)
    level: F64  # (rows,)
    scale: F64  # (rows,)


@dataclass(frozen=True)
class Periods:
    """Each row's best repeating lag (0: none found or not enough history) and how much better it predicts
    than the last value (log of the error ratio: negative = better)."""

    lag: I64
    log_error: F64


def fill_unknown(history: F64) -> F64:
    """Replace NaN by the last known value before it (the first known one for leading NaN); an all-NaN
    row becomes zeros. Rows of known values come back unchanged."""
    h = np.asarray(history, dtype=np.float64)
    nan = np.isnan(h)
    if not nan.any():
        return h
    n = h.shape[1]
    idx = np.where(~nan, np.arange(n), 0)
    np.maximum.accumulate(idx, axis=1, out=idx)
    out = np.take_along_axis(h, idx, axis=1)
    first = np.argmax(~nan, axis=1)
    first_val = h[np.arange(len(h)), first]
    out = np.where(np.isnan(out), first_val[:, None], out)
    return np.nan_to_num(out, nan=0.0)


def _std(x: F64, total: F64 | None = None) -> F64:
    # Sums via einsum, not np.std: this runs on (30k, 288) arrays every cycle and np.std is several times
    # slower. `total`: x's row sums, when the caller has them already.
    n = x.shape[1]
    s1 = x.sum(axis=1) if total is None else total
    s2 = np.einsum("ij,ij->i", x, x)
    return np.asarray(np.sqrt(np.maximum(s2 / n - (s1 / n) ** 2, 0.0)))


def scale_of(level: F64, changes: F64) -> F64:
    """The mean absolute step-to-step change, floored by 0.1 % of the level so a flat series still has a
    unit, and by a tiny absolute value so an all-zero one does not divide by zero."""
    step = np.abs(changes).mean(axis=1) if changes.shape[1] else np.zeros(len(changes))
    return np.asarray(np.maximum(np.maximum(step, 1e-3 * np.abs(level)), 1e-9))


def calendar(ts: F64) -> F64:
    """Time of day and day of week as points on circles (so 23:55 is next to 00:00), shape (rows, 4)."""
    tod = 2 * math.pi * np.mod(ts, DAY) / DAY
    dow = 2 * math.pi * np.mod(np.floor(ts / DAY) + _EPOCH_WEEKDAY, 7) / 7
    return np.stack([np.sin(tod), np.cos(tod), np.sin(dow), np.cos(dow)], axis=1)


def detect_periods(history: F64, spec: FeatureSpec) -> Periods:
    """For each row, the lag in [2, lag_max] whose "same as one cycle ago" forecast had the smallest mean
    absolute error over the last `lag_fit` steps. Rows without `lag_fit + lag_max` known values get 0."""
    history = np.asarray(history, dtype=np.float64)
    rows, steps = history.shape
    if rows > CHUNK_ROWS:
        parts = _chunks(lambda a: detect_periods(history[a : a + CHUNK_ROWS], spec), rows)
        return Periods(np.concatenate([p.lag for p in parts]), np.concatenate([p.log_error for p in parts]))
    need = spec.lag_fit + spec.lag_max
    lag = np.zeros(rows, dtype=np.int64)
    log_error = np.zeros(rows)
    if steps < need or spec.lag_max < 2:
        return Periods(lag, log_error)
    tail = history[:, -need:]
    ok = ~np.isnan(tail).any(axis=1)
    if not ok.any():
        return Periods(lag, log_error)
    # float32 halves the memory traffic of the lag loop, the slowest part of featurisation
    x = np.nan_to_num(tail[ok]).astype(np.float32)
    m = spec.lag_fit
    target = x[:, -m:]
    errs = np.empty((len(x), spec.lag_max), dtype=np.float32)
    for p in range(1, spec.lag_max + 1):
        errs[:, p - 1] = np.abs(target - x[:, need - m - p : need - p]).mean(axis=1)
    # The shortest lag within 10 % of the best: the fundamental cycle, not a multiple of it (which would
    # average fewer cycles) nor a lag that wins by noise.
    cand = errs[:, 1:]
    good = cand <= cand.min(axis=1, keepdims=True) * 1.1 + 1e-12
    best = np.argmax(good, axis=1) + 2
    e_best = errs[np.arange(len(x)), best - 1].astype(np.float64)
    e_last = errs[:, 0].astype(np.float64)
    eps = 1e-9 + 1e-6 * np.abs(x[:, -m:]).mean(axis=1)
    lag[ok] = best
    log_error[ok] = np.clip(np.log((e_best + eps) / (e_last + eps)), -5.0, 2.0)
    return Periods(lag, log_error)


def period_slots(
    origin_ts: F64, grid_seconds: float, refresh_steps: int
) -> tuple[F64, npt.NDArray[np.int64]]:
    """When each origin's cycle is detected: (slot, steps back). Periods drift slowly and detecting them
    costs as much as the rest of featurisation, so they are detected once per slot of `refresh_steps`
    forecast steps, from the history that ends at the slot's first step (`steps back` from the origin).
    Slots count steps from the epoch, not from a process's start, so a restarted controller, the running
    one and the backtest detect the same periods from the same history. `grid_seconds`: the spacing of the
    origins (the model's step, or less in a lab that compresses time). `refresh_steps` 0: at every origin."""
    origin_ts = np.asarray(origin_ts, dtype=np.float64)
    if refresh_steps <= 0:
        return origin_ts.copy(), np.zeros(len(origin_ts), dtype=np.int64)
    k = np.round(origin_ts / grid_seconds)  # the origins' step numbers on their grid
    slot = np.floor(k / refresh_steps)
    return slot, (k - slot * refresh_steps).astype(np.int64)


def refresh_steps(refresh_seconds: float, step_seconds: float) -> int:
    """`refresh_seconds` of the model's time in its steps (0: detect at every origin)."""
    return max(1, round(refresh_seconds / step_seconds)) if refresh_seconds > 0 else 0


def build_features(
    history: F64,
    origin_ts: F64,
    step_seconds: float,
    spec: FeatureSpec,
    signals: F64 | None = None,
    periods: Periods | None = None,
    signal_repeat: int = 1,
) -> Features:
    """Features for `rows` series.

    history: (rows, steps) values, oldest first, the last one at the origin; NaN = unknown.
    origin_ts: (rows,) unix seconds of the last value.
    signals: (rows / signal_repeat, len(spec.signals), steps) request-rate series aligned with history, NaN
      where the agent did not capture them (a host without BPF), or None for none at all. Each row of
      signals serves `signal_repeat` consecutive rows of history: the engine's rows are a workload's
      resources, which share its signals (their features are computed once per workload).
    periods: from `detect_periods(history, spec)`, computed here if not given.
    """
    history = np.asarray(history, dtype=np.float64)
    if history.ndim != 2 or history.shape[1] < 1:
        raise ValueError(f"history must be (rows, steps), got shape {history.shape}")
    rows = history.shape[0]
    if signal_repeat < 1 or rows % signal_repeat:
        raise ValueError(f"signal_repeat must divide the {rows} rows, got {signal_repeat}")
    if periods is None:
        periods = detect_periods(history, spec)
    origin_ts = np.asarray(origin_ts, dtype=np.float64)
    n_sig = rows // signal_repeat
    sig = (
        _signal_features(signals, n_sig, spec)
        if signals is None or n_sig <= CHUNK_ROWS
        else np.concatenate(
            _chunks(
                lambda a: _signal_features(signals[a : a + CHUNK_ROWS], min(CHUNK_ROWS, n_sig - a), spec),
                n_sig,
            )
        )
    )
    if signal_repeat > 1:
        sig = np.repeat(sig, signal_repeat, axis=0)
    if rows <= CHUNK_ROWS:
        return _build(history, origin_ts, step_seconds, spec, sig, periods)
    # In chunks: the temporaries of a few thousand rows stay in cache and are reused, where those of
    # 30,000 rows are fresh pages every time; this halves the time for a big fleet.
    p = periods
    x = np.empty((rows, spec.n_features), dtype=np.float32)  # each chunk writes its rows in place
    parts = _chunks(
        lambda a: _build(
            history[a : a + CHUNK_ROWS],
            origin_ts[a : a + CHUNK_ROWS],
            step_seconds,
            spec,
            sig[a : a + CHUNK_ROWS],
            Periods(p.lag[a : a + CHUNK_ROWS], p.log_error[a : a + CHUNK_ROWS]),
            x[a : a + CHUNK_ROWS],
        ),
        rows,
    )
    return Features(x, np.concatenate([f.level for f in parts]), np.concatenate([f.scale for f in parts]))


def _build(
    history: F64,
    origin_ts: F64,
    step_seconds: float,
    spec: FeatureSpec,
    signal_features: F64,
    periods: Periods,
    out: F32 | None = None,
) -> Features:
    steps = history.shape[1]
    P = spec.season_steps(step_seconds)
    # Featurisation is memory-bound (10,000 workloads are 70 MB of history), so it touches the whole
    # day once and works on the last `tail_window` steps otherwise. That one pass is the day's max, which
    # also finds the rows with gaps (max propagates NaN): they are filled, and their max taken again.
    day_max = _last(history, P).max(axis=1)
    nan_rows = np.isnan(day_max)
    if steps > P:
        nan_rows |= np.isnan(history[:, : steps - P].max(axis=1))
    h = history
    if nan_rows.any():
        h = _fill_rows(history, nan_rows)
        day_max[nan_rows] = _last(h[nan_rows], P).max(axis=1)

    recent = _last(h, spec.window)
    # The level is the median of the last three values: close to the last value (so the input that
    # matters most is near 0 and never squashed), but not thrown by a single spike.
    a, b, c = recent[:, -3], recent[:, -2], recent[:, -1]
    level = a + b + c - np.maximum(np.maximum(a, b), c) - np.minimum(np.minimum(a, b), c)
    tail = _last(h, spec.tail_window + 1)
    changes = np.diff(tail, axis=1)
    scale = scale_of(level, changes)
    inv = 1.0 / scale

    def norm(x: F64) -> F64:
        return np.asarray((x - level[:, None]) * inv[:, None])

    parts: list[F64] = [norm(recent)]

    # Yesterday around the same time. Where it is unknown, show the level: neutral, and `day_known` tells
    # the model not to trust it.
    idx = steps - 1 - P + np.asarray(spec.season_offsets())
    cols = np.clip(idx, 0, steps - 1)
    day_cols = h[:, cols]
    day_known_cols = ~np.isnan(history[:, cols]) & (idx >= 0)[None, :]
    day_known = day_known_cols.all(axis=1)
    parts.append(np.where(day_known_cols, norm(day_cols), 0.0))

    tail_sum = tail.sum(axis=1)
    parts.append(
        np.stack(
            [
                day_known.astype(np.float64),
                (day_max - level) * inv,
                (tail.max(axis=1) - level) * inv,
                (tail.min(axis=1) - level) * inv,
                (tail_sum / tail.shape[1] - level) * inv,
                np.log(np.maximum(_std(recent) * inv, 1e-4)),
                np.log(np.maximum(_std(tail, tail_sum) * inv, 1e-4)),
            ],
            axis=1,
        )
    )
    parts.append(_tail_features(changes, inv))
    parts.append(_cycle_features(h, periods, level, inv, spec))
    parts.append(calendar(origin_ts + step_seconds))
    parts.append(signal_features)
    x = _squash(np.concatenate(parts, axis=1), spec.clip)
    if out is None:
        return Features(x.astype(np.float32), level, scale)
    out[...] = x
    return Features(out, level, scale)


def _fill_rows(history: F64, rows: npt.NDArray[np.bool_]) -> F64:
    out = history.copy()
    out[rows] = fill_unknown(history[rows])
    return out


def _squash(x: F64, limit: float) -> F64:
    """Linear within +-limit, logarithmic beyond: a value 1000 typical moves away stays distinguishable from
    one 50 away, but cannot dominate the network's sums. In place; only the few big values are touched."""
    big = np.nonzero(np.abs(x) > limit)
    if len(big[0]):
        v = x[big]
        x[big] = np.sign(v) * (limit + np.log1p(np.abs(v) - limit))
    return x


def _last(a: F64, n: int) -> F64:
    """The last n columns, edge-padded on the left when the row is shorter."""
    if a.shape[1] >= n:
        return a[:, -n:]
    return np.concatenate([np.repeat(a[:, :1], n - a.shape[1], axis=1), a], axis=1)


def _tail_features(changes: F64, inv: F64) -> F64:
    """How big the recent up and down moves were, in units of the scale: a series that jumps needs wide
    upper quantiles even when its typical move is small. Signed log so spikes stay in range."""
    # (a full sort: np.partition with these four ranks measured 5 times slower on (2048, 72) rows)
    d = np.sort(changes * inv[:, None], axis=1)
    n = d.shape[1]
    idx = [min(n - 1, max(0, round(q * (n - 1)))) for q in _TAIL_QUANTILES]
    t = d[:, idx]
    return np.asarray(np.sign(t) * np.log1p(np.abs(t)))


def _cycle_indices(steps: int, horizon: int, cycles: int, lag: I64) -> I64:
    """Column of "k cycles before origin + h" for h in 1..horizon, k in 1..cycles, folded back into the
    known past when h is longer than the cycle: shape (rows, horizon, cycles)."""
    p = np.maximum(lag, 1)[:, None]
    h = np.arange(1, horizon + 1)[None, :]
    # the latest known column that is h steps ahead modulo the cycle: origin + h - ceil(h / p) * p
    first = (steps - 1) + h - (-(-h // p)) * p  # (rows, horizon)
    k = np.arange(cycles)[None, None, :]
    return np.asarray(np.clip(first[:, :, None] - k * p[:, :, None], 0, steps - 1))


@functools.lru_cache(maxsize=8)
def _cycle_table(steps: int, horizon: int, cycles: int, lag_max: int) -> I64:
    """`_cycle_indices` for every lag 0..lag_max: (lag_max + 1, horizon, cycles). Shared: read-only."""
    table = _cycle_indices(steps, horizon, cycles, np.arange(lag_max + 1))
    table.flags.writeable = False
    return table


def _cycle_features(h: F64, periods: Periods, level: F64, inv: F64, spec: FeatureSpec) -> F64:
    """Per horizon step: the value one cycle back, the mean and spread over `lag_cycles` cycles back (the
    mean cancels noise, the spread says how regular the cycle is) and the trusted mean; then whether a
    cycle was found, its length (as a fraction of lag_max) and how much better than the last value it
    predicted."""
    rows, steps = h.shape
    H, K = spec.horizon, spec.lag_cycles
    out = np.zeros((rows, 4 * H + 3))
    has = periods.lag >= 2
    if not has.any():
        return out
    sel = np.flatnonzero(has)
    lag = periods.lag[sel]
    # the columns depend on the lag alone: gathered from a table of every lag, not computed per row
    table = _cycle_table(steps, H, K, spec.lag_max)
    idx = table[lag] if int(lag.max()) < len(table) else _cycle_indices(steps, H, K, lag)
    # gather only the needed values (h[sel] would copy whole rows)
    vals = h[sel[:, None, None], idx]
    z = (vals - level[sel, None, None]) * inv[sel, None, None]
    out[sel, :H] = z[:, :, 0]
    # einsum, not mean(axis=2): numpy's reductions over an axis of 6 are 4 to 5 times slower
    mean = np.einsum("ijk->ij", z) / K
    out[sel, H : 2 * H] = mean
    out[sel, 2 * H : 3 * H] = np.sqrt(np.maximum(np.einsum("ijk,ijk->ij", z, z) / K - mean * mean, 0.0))
    # The cycle mean scaled by how much better than "same as now" the cycle predicted (1 = far better,
    # 0 = no better): the product a network would otherwise have to learn, for a strong regular job, as
    # a plain input its linear part can use.
    trust = np.clip(1.0 - np.exp(periods.log_error[sel]), 0.0, 1.0)
    out[sel, 3 * H : 4 * H] = mean * trust[:, None]
    out[sel, 4 * H] = 1.0
    out[sel, 4 * H + 1] = periods.lag[sel] / spec.lag_max
    out[sel, 4 * H + 2] = periods.log_error[sel]
    return out


def _signal_features(signals: F64 | None, rows: int, spec: FeatureSpec) -> F64:
    """The latest request-rate values relative to their own recent mean and spread (a jump in accepts
    says demand is coming, whatever the unit), and whether the agent captured them."""
    k = spec.signal_window
    per = k + 1
    out = np.zeros((rows, per * len(spec.signals)))
    if signals is None or not spec.signals:
        return out
    signals = np.asarray(signals, dtype=np.float64)
    if signals.ndim != 3 or signals.shape[:2] != (rows, len(spec.signals)):
        raise ValueError(
            f"signals must be (rows, {len(spec.signals)}, steps) with rows = {rows}, got {signals.shape}"
        )
    for j in range(len(spec.signals)):
        s = signals[:, j, -spec.window :]
        present = ~np.isnan(s[:, -1])
        if not present.any():
            continue
        w = _last(fill_unknown(s), spec.window)
        mean = w.mean(axis=1)
        sc = np.maximum(np.maximum(_std(w), 1e-3 * np.abs(mean)), 1e-9)
        z = (w[:, -k:] - mean[:, None]) / sc[:, None]
        out[:, j * per : j * per + k] = np.where(present[:, None], z, 0.0)
        out[:, j * per + k] = present
    return out


def denormalise(y: npt.NDArray[np.floating], level: F64, scale: F64) -> F64:
    """Model output (rows, ..., quantiles) in normalised units back to the series' units."""
    extra = (slice(None),) + (None,) * (y.ndim - 1)
    out = np.empty(y.shape, dtype=np.float64)

    def part(a: int) -> None:
        sl = slice(a, a + CHUNK_ROWS)
        np.multiply(y[sl], scale[sl][extra], out=out[sl])  # widened on the fly: no separate copy
        out[sl] += level[sl][extra]

    _chunks(part, len(y))  # a big batch's 1.6 million values: on the featurisation threads too
    return out


def sliding_history(values: F64, steps: int) -> F64:
    """For every origin t of one series, the `steps` values ending at t, NaN before the start:
    shape (len(values), steps), a read-only view (no copy)."""
    padded = np.concatenate([np.full(steps - 1, np.nan), np.asarray(values, dtype=np.float64)])
    return np.lib.stride_tricks.sliding_window_view(padded, steps)


def resample(
    end_s: F64,
    values: F64,
    step_seconds: float,
    until_s: float | None = None,
    how: str = "mean",
    weights: F64 | None = None,
) -> tuple[F64, F64]:
    """Irregular samples (end time, value) onto a grid of `step_seconds`: one value per step (the mean or
    max of the samples ending in it), NaN for steps with none. The grid ends at the step holding `until_s`
    (default: the last sample). `weights`: how many samples each value stands for (a compacted step's mean
    counts as its samples; default 1 each). Returns (step end times, values)."""
    end_s = np.asarray(end_s, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if len(end_s) == 0:
        return np.zeros(0), np.zeros(0)
    last = math.ceil((until_s if until_s is not None else float(end_s.max())) / step_seconds)
    first = math.ceil(float(end_s.min()) / step_seconds)
    n = last - first + 1
    bucket = np.ceil(end_s / step_seconds).astype(np.int64) - first
    keep = (bucket >= 0) & (bucket < n)
    bucket, v = bucket[keep], values[keep]
    out = np.full(n, np.nan)
    if how == "max":
        np.fmax.at(out, bucket, v)
    elif how == "mean":
        wk = None if w is None else w[keep]
        sums = np.bincount(bucket, weights=v if wk is None else v * wk, minlength=n)
        counts = np.bincount(bucket, weights=wk, minlength=n)
        np.divide(sums, counts, out=out, where=counts > 0)
    else:
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
    grid = (first + np.arange(n, dtype=np.float64)) * float(step_seconds)
    return grid, out
