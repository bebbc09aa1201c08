"""Training: series in, ONNX model file out.

The network (net.py) is trained in numpy on examples from every series: at each origin, the features of
the history up to it and the next `horizon` values, normalised. Each series counts equally whatever its
length (a 3-week trace must not drown a 2-week one), and steps inside event windows (failovers, badly
wrong forecasts) count more. Needs only numpy to train and `onnx` to write the file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.predict import net
from controller.predict.events import Event, EventWeighting, event_weights, find_forecast_misses
from controller.predict.export import write_model
from controller.predict.features import (
    SIGNALS,
    FeatureSpec,
    build_features,
    denormalise,
    detect_periods,
    fill_unknown,
    resample,
    sliding_history,
)
from controller.predict.model import Forecaster
from controller.predict.traces import Trace

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

QUANTILES = (0.1, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
RESOURCES = ("cpu", "memory", "io")
# Normalised targets beyond this many typical moves are clipped: such a jump is unforecastable from the
# history, and an unclipped one only pulls the upper quantiles of every series towards it.
TARGET_CLIP = 100.0
MODEL_VERSION_PREFIX = "sp1"
# store column -> (resource name, how samples in one step combine)
STORE_RESOURCES = {
    "cpu_cores": ("cpu", "mean"),
    "memory_bytes": ("memory", "max"),  # memory is sized for its peak, not its average
    "io_bytes_per_second": ("io", "mean"),
}
STORE_SIGNALS = {"syscalls_per_second": "syscalls", "accepts_per_second": "accepts"}
DEFAULT_SPEC = FeatureSpec()
DEFAULT_SETTINGS = net.TrainSettings()
DEFAULT_WEIGHTING = EventWeighting()


@dataclass(frozen=True)
class TrainingSeries:
    name: str
    timestamps: I64  # unix seconds per step
    values: F64
    step_seconds: int
    signals: F64 | None = None  # (len(spec.signals), steps), NaN where not captured
    weights: F64 | None = None  # per step, from events; 1 = ordinary

    def __len__(self) -> int:
        return len(self.values)

    def as_trace(self) -> Trace:
        return Trace(self.name, self.timestamps, self.values)

    def tail_from(self, start_s: float) -> int:
        """Index of the first step after start_s."""
        return int(np.searchsorted(self.timestamps, start_s, side="right"))


def series_from_trace(t: Trace) -> TrainingSeries:
    return TrainingSeries(t.name, t.timestamps, t.values, t.step_seconds)


@dataclass
class Dataset:
    x: F32
    y: F64
    w: F64
    series: list[str] = field(default_factory=list)
    rows_per_series: list[int] = field(default_factory=list)


def series_examples(
    s: TrainingSeries, spec: FeatureSpec, chunk: int = 4096
) -> tuple[F32, F64, F64, F64, F64]:
    """(x, normalised targets, per-example event weight, level, scale) for every usable origin of one
    series: origins with at least `window` steps behind and `horizon` steps ahead."""
    n, H = len(s), spec.horizon
    origins = np.arange(spec.window - 1, n - H)
    if len(origins) == 0:
        empty = np.zeros(0)
        return np.zeros((0, spec.n_features), np.float32), np.zeros((0, H)), empty, empty, empty
    steps = spec.history_steps(s.step_seconds)
    hist = sliding_history(s.values, steps)
    sig_hist = None
    if s.signals is not None:
        sig_hist = np.stack([sliding_history(row, steps) for row in s.signals], axis=1)
    xs, levels, scales = [], [], []
    for a in range(0, len(origins), chunk):
        o = origins[a : a + chunk]
        h = np.asarray(hist[o])
        f = build_features(
            h,
            s.timestamps[o].astype(np.float64),
            s.step_seconds,
            spec,
            None if sig_hist is None else np.asarray(sig_hist[o]),
            detect_periods(h, spec),
        )
        xs.append(f.x)
        levels.append(f.level)
        scales.append(f.scale)
    level, scale = np.concatenate(levels), np.concatenate(scales)
    future = np.stack([s.values[origins + k] for k in range(1, H + 1)], axis=1)
    y = np.clip((future - level[:, None]) / scale[:, None], -TARGET_CLIP, TARGET_CLIP)
    if s.weights is None:
        w = np.ones(len(origins))
    else:
        # An example is as important as the most important step it forecasts.
        w = np.stack([s.weights[origins + k] for k in range(1, H + 1)], axis=1).max(axis=1)
    return np.concatenate(xs), y, w, level, scale


def build_dataset(series: list[TrainingSeries], spec: FeatureSpec) -> Dataset:
    xs, ys, ws, names, counts = [], [], [], [], []
    for s in series:
        x, y, w, _, _ = series_examples(s, spec)
        if len(x) == 0:
            log.info("series %s: %d steps is too short to train on; skipped", s.name, len(s))
            continue
        xs.append(x)
        ys.append(y)
        # every series weighs the same in total, whatever its length
        ws.append(w / len(x))
        names.append(s.name)
        counts.append(len(x))
    if not xs:
        raise ValueError(
            f"no series long enough to train on: each needs more than {spec.window + spec.horizon} steps"
        )
    return Dataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), names, counts)


@dataclass(frozen=True)
class TrainedModel:
    params: net.NetParams
    spec: FeatureSpec
    quantiles: tuple[float, ...]
    step_seconds: int
    resources: tuple[str, ...]
    training_data: dict[str, Any]
    settings: net.TrainSettings
    train_loss: float
    version: str

    def metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "step_seconds": str(self.step_seconds),
            "window": str(self.spec.window),
            "horizon": str(self.spec.horizon),
            "quantiles": list(self.quantiles),
            "features": self.spec.to_dict(),
            "feature_names": self.spec.names(),
            "resources": list(self.resources),
            "training_data": self.training_data,
            "trainer": {
                "network": f"MLP {self.spec.n_features}-{self.settings.hidden}-"
                f"{self.spec.horizon * len(self.quantiles)} + linear skip, cumulative-softplus quantiles",
                "loss": "pinball, weighted",
                "train_loss": round(self.train_loss, 6),
                **{k: v for k, v in vars(self.settings).items()},
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def save(self, path: str | Path) -> None:
        write_model(path, self.params, self.spec.horizon, len(self.quantiles), self.metadata())


class NumpyForecaster:
    """The trained network evaluated in numpy (float64): what the trainer believes; the ONNX file must
    give the same numbers."""

    def __init__(self, m: TrainedModel) -> None:
        self.model = m
        self.name = f"model {m.version} (numpy)"
        self.quantiles = m.quantiles
        self.horizon = m.spec.horizon
        self.spec = m.spec

    def predict_rows(
        self,
        history: F64,
        origin_ts: F64,
        step_seconds: float,
        signals: F64 | None = None,
        periods: Any = None,
    ) -> F64:
        f = build_features(history, origin_ts, step_seconds, self.spec, signals, periods)
        y = net.forward(self.model.params, f.x, self.horizon, len(self.quantiles))
        return denormalise(y, f.level, f.scale)


def describe_series(series: list[TrainingSeries], source: str) -> dict[str, Any]:
    return {
        "source": source,
        "series": [s.name for s in series],
        "steps": int(sum(len(s) for s in series)),
        "step_seconds": sorted({int(s.step_seconds) for s in series}),
        "from": _iso(min(int(s.timestamps[0]) for s in series)),
        "to": _iso(max(int(s.timestamps[-1]) for s in series)),
        "weighted_steps": int(sum(int((s.weights > 1).sum()) for s in series if s.weights is not None)),
    }


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def train_model(
    series: list[TrainingSeries],
    source: str,
    spec: FeatureSpec = DEFAULT_SPEC,
    quantiles: tuple[float, ...] = QUANTILES,
    settings: net.TrainSettings = DEFAULT_SETTINGS,
    resources: tuple[str, ...] = RESOURCES,
    progress: Callable[[int, float], None] | None = None,
) -> TrainedModel:
    ds = build_dataset(series, spec)
    log.info("training on %d examples from %d series", len(ds.x), len(ds.series))
    params = net.train(ds.x, ds.y, quantiles, ds.w, settings, progress)
    loss = net.pinball(
        net.forward(params, ds.x, spec.horizon, len(quantiles)), ds.y, np.asarray(quantiles), ds.w
    )
    digest = hashlib.sha256(b"".join(a.tobytes() for a in params.arrays().values())).hexdigest()[:10]
    steps = [int(s.step_seconds) for s in series]
    return TrainedModel(
        params=params,
        spec=spec,
        quantiles=quantiles,
        step_seconds=int(np.median(steps)),
        resources=resources,
        training_data=describe_series(series, source),
        settings=settings,
        train_loss=loss,
        version=f"{MODEL_VERSION_PREFIX}-{digest}",
    )


def recent_loss(forecaster: Forecaster, series: list[TrainingSeries], since_s: dict[str, float]) -> float:
    """Mean pinball loss (over quantiles and horizon steps, relative to the series' mean usage) of the
    forecasts whose targets all fall after `since_s[series]`; the mean over series. This is what champion
    and challenger are compared on."""
    losses = []
    q = np.asarray(forecaster.quantiles)
    H = forecaster.horizon
    for s in series:
        start = s.tail_from(since_s.get(s.name, -math.inf))
        first_origin = max(start - 1, 0)
        if len(s) - H - first_origin < 1:
            continue
        steps = forecaster.spec.history_steps(s.step_seconds)
        origins = np.arange(first_origin, len(s) - H)
        hist = np.asarray(sliding_history(s.values, steps)[origins])
        curves = forecaster.predict_rows(
            hist,
            s.timestamps[origins].astype(np.float64),
            s.step_seconds,
            periods=detect_periods(hist, forecaster.spec),
        )
        future = np.stack([s.values[origins + k] for k in range(1, H + 1)], axis=1)
        d = future[..., None] - curves
        pin = np.maximum(q * d, (q - 1) * d).mean()
        scale = float(np.mean(np.abs(s.values[start:]))) or 1.0
        losses.append(pin / scale)
    return float(np.mean(losses)) if losses else math.nan


def split_recent(
    series: list[TrainingSeries], holdout_seconds: float
) -> tuple[list[TrainingSeries], dict[str, float]]:
    """Each series without its last `holdout_seconds` (to train a challenger on), and where each holdout
    starts (to score champion and challenger on the same unseen data)."""
    train, since = [], {}
    for s in series:
        cut_s = float(s.timestamps[-1]) - holdout_seconds
        i = s.tail_from(cut_s)
        since[s.name] = cut_s
        if i > 0:
            train.append(
                replace(
                    s,
                    timestamps=s.timestamps[:i],
                    values=s.values[:i],
                    signals=None if s.signals is None else s.signals[:, :i],
                    weights=None if s.weights is None else s.weights[:i],
                )
            )
    return train, since


def miss_events(forecaster: Forecaster, s: TrainingSeries, tolerance: float = 3.0) -> list[Event]:
    """Where `forecaster` (the running model) was badly wrong one step ahead on this series."""
    if len(s) < 3:
        return []
    steps = forecaster.spec.history_steps(s.step_seconds)
    hist = sliding_history(s.values, steps)
    curves = np.empty((len(s), forecaster.horizon, len(forecaster.quantiles)))
    scale = np.empty(len(s))
    for a in range(0, len(s), 4096):
        h = np.asarray(hist[a : a + 4096])
        periods = detect_periods(h, forecaster.spec)
        curves[a : a + 4096] = forecaster.predict_rows(
            h, s.timestamps[a : a + 4096].astype(np.float64), s.step_seconds, periods=periods
        )
        scale[a : a + 4096] = build_features(
            h, s.timestamps[a : a + 4096].astype(np.float64), s.step_seconds, forecaster.spec, periods=periods
        ).scale
    lower = np.full(len(s), np.nan)
    upper = np.full(len(s), np.nan)
    sc = np.full(len(s), np.nan)
    lower[1:], upper[1:], sc[1:] = curves[:-1, 0, 0], curves[:-1, 0, -1], scale[:-1]
    # the first day has too little history for the forecast to be judged
    day = max(1, round(86400 / s.step_seconds))
    lower[:day] = np.nan
    return find_forecast_misses(s.name, s.timestamps, s.values, lower, upper, sc, tolerance)


def apply_events(
    series: list[TrainingSeries], events: list[Event], weighting: EventWeighting = DEFAULT_WEIGHTING
) -> list[TrainingSeries]:
    out = []
    for s in series:
        w = event_weights(s.timestamps, events, s.name, weighting)
        if s.weights is not None:
            w = np.maximum(w, s.weights)
        out.append(replace(s, weights=w))
    return out


def weight_by_events(
    series: list[TrainingSeries],
    events: list[Event],
    judge: Forecaster,
    weighting: EventWeighting = DEFAULT_WEIGHTING,
) -> tuple[list[TrainingSeries], list[Event]]:
    """The given events (failovers) plus every window where `judge` (the running model, or the fallback
    when there is none) was badly wrong one step ahead, applied as training weights."""
    found = list(events)
    for s in series:
        found.extend(miss_events(judge, s))
    return apply_events(series, found, weighting), found


def series_from_store(
    columns: dict[tuple[str, str], dict[str, list[float]]], step_seconds: int, min_steps: int = 1
) -> list[TrainingSeries]:
    """The store's samples (`Store.resource_series`) as one training series per workload and resource,
    resampled onto `step_seconds`; the request-rate signals ride along. Steps with no sample are filled
    from the previous one (the agent was away; the workload most likely did what it did before)."""
    out = []
    for (host, workload), cols in sorted(columns.items()):
        end_s = np.asarray(cols["end_ms"], dtype=np.float64) / 1000.0
        if len(end_s) == 0:
            continue
        sigs = []
        for col in STORE_SIGNALS:
            _, v = resample(end_s, np.asarray(cols[col]), step_seconds)
            sigs.append(v)
        for col, (resource, how) in STORE_RESOURCES.items():
            grid, v = resample(end_s, np.asarray(cols[col]), step_seconds, how=how)
            if int((~np.isnan(v)).sum()) < min_steps:
                continue
            filled = fill_unknown(v[None, :])[0]
            out.append(
                TrainingSeries(
                    name=f"{host}/{workload}/{resource}",
                    timestamps=grid.astype(np.int64),
                    values=filled,
                    step_seconds=step_seconds,
                    signals=np.stack(sigs) if len(sigs) == len(SIGNALS) else None,
                )
            )
    return out
