"""Training: series in, ONNX model file out.

The network (net.py) is trained in numpy on examples from every series: at each origin, the features of
the history up to it and the next `horizon` values, normalised. Each series counts equally whatever its
length (a 3-week trace must not drown a 2-week one), and steps inside event windows (failovers, badly
wrong forecasts) count more. Needs only numpy to train and `onnx` to write the file.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controller import telemetry_schema
from controller.predict.features import (
    FeatureSpec,
    build_features,
    denormalise,
    detect_periods,
    sliding_history,
)
from controller.predict.model import DEFAULT_QUANTILES, Forecaster
from controller.predict.series import Series
from training import net
from training.event_weights import Event, EventWeighting, event_weights, find_forecast_misses
from training.export import write_model
from training.traces import Trace

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

QUANTILES = DEFAULT_QUANTILES
RESOURCES = telemetry_schema.RESOURCES
# Normalised targets beyond this many typical moves are clipped: such a jump is unforecastable from the
# history, and an unclipped one only pulls the upper quantiles of every series towards it.
TARGET_CLIP = 100.0
MODEL_VERSION_PREFIX = "sp1"
DEFAULT_SPEC = FeatureSpec()
DEFAULT_SETTINGS = net.TrainSettings()
DEFAULT_WEIGHTING = EventWeighting()


def series_from_trace(t: Trace) -> Series:
    return Series(t.name, t.timestamps, t.values, t.step_seconds)


@dataclass
class Dataset:
    x: F32
    y: F64
    w: F64
    series: list[str] = field(default_factory=list)
    rows_per_series: list[int] = field(default_factory=list)


def series_examples(s: Series, spec: FeatureSpec, chunk: int = 4096) -> tuple[F32, F64, F64, F64, F64]:
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


def build_dataset(series: list[Series], spec: FeatureSpec) -> Dataset:
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
        signal_repeat: int = 1,
    ) -> F64:
        f = build_features(history, origin_ts, step_seconds, self.spec, signals, periods, signal_repeat)
        y = net.forward(self.model.params, f.x, self.horizon, len(self.quantiles))
        return denormalise(y, f.level, f.scale)


def describe_series(series: list[Series], source: str) -> dict[str, Any]:
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
    series: list[Series],
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


def split_recent(series: list[Series], holdout_seconds: float) -> tuple[list[Series], dict[str, float]]:
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


def miss_events(forecaster: Forecaster, s: Series, tolerance: float = 3.0) -> list[Event]:
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
    series: list[Series], events: list[Event], weighting: EventWeighting = DEFAULT_WEIGHTING
) -> list[Series]:
    out = []
    for s in series:
        w = event_weights(s.timestamps, events, s.name, weighting)
        if s.weights is not None:
            w = np.maximum(w, s.weights)
        out.append(replace(s, weights=w))
    return out


def weight_by_events(
    series: list[Series],
    events: list[Event],
    judge: Forecaster,
    weighting: EventWeighting = DEFAULT_WEIGHTING,
) -> tuple[list[Series], list[Event]]:
    """The given events (failovers) plus every window where `judge` (the running model, or the fallback
    when there is none) was badly wrong one step ahead, applied as training weights."""
    found = list(events)
    for s in series:
        found.extend(miss_events(judge, s))
    return apply_events(series, found, weighting), found
