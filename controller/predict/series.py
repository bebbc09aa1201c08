"""Stored telemetry as series on one step grid: what the engine forecasts from and what training learns from.

The store keeps irregular samples (one per agent interval); the model works in steps. Both readers here
resample the store's columns (`controller.telemetry_schema`: which columns, and how samples combine in a
step) the same way:

    batch = history_from_store(store, now_ms, step_seconds, steps)    # the engine, every cycle
    series = series_from_store(store.resource_series(...), step)       # training, champion/challenger
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller import telemetry_schema as schema
from controller.predict.features import fill_unknown, resample
from controller.store.base import Store

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Columns = dict[str, list[float]]  # one workload's `Store.resource_series` columns


@dataclass(frozen=True)
class Series:
    """One series on a step grid: one resource of one workload (named host/workload/resource), or a trace."""

    name: str
    timestamps: I64  # unix seconds per step
    values: F64
    step_seconds: int
    signals: F64 | None = None  # (len(SIGNALS), steps), NaN where not captured
    weights: F64 | None = None  # per step, from events; 1 = ordinary (training only)

    def __len__(self) -> int:
        return len(self.values)

    def tail_from(self, start_s: float) -> int:
        """Index of the first step after start_s."""
        return int(np.searchsorted(self.timestamps, start_s, side="right"))


@dataclass(frozen=True)
class SeriesBatch:
    """Every workload's recent history on one step grid: the input of one forecast cycle."""

    keys: tuple[str, ...]  # one per workload, e.g. "host/workload"
    origin_ts: F64  # (N,) unix seconds of each workload's latest step
    step_seconds: int
    values: F64  # (N, len(resources), steps), oldest first, NaN = unknown
    signals: F64 | None = None  # (N, len(SIGNALS), steps) request-rate series, NaN = not captured
    resources: tuple[str, ...] = schema.RESOURCES

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.values.ndim != 3 or self.values.shape[:2] != (n, len(self.resources)):
            raise ValueError(
                f"values must be (workloads, resources, steps) = ({n}, {len(self.resources)}, steps), "
                f"got {self.values.shape}"
            )
        if self.origin_ts.shape != (n,):
            raise ValueError(f"origin_ts must have one entry per workload ({n}), got {self.origin_ts.shape}")
        if self.signals is not None and self.signals.shape != (n, len(schema.SIGNALS), self.values.shape[2]):
            raise ValueError(f"signals must be ({n}, {len(schema.SIGNALS)}, steps), got {self.signals.shape}")


def resample_workload(
    cols: Columns, step_seconds: float, until_s: float | None = None
) -> tuple[F64, dict[str, F64]]:
    """One workload's stored columns on the step grid: (step end times, values of every series by name),
    each step the mean or max of its samples as the schema says; NaN for steps without a sample."""
    end_s = np.asarray(cols["end_ms"], dtype=np.float64) / 1000.0
    grid = np.zeros(0)
    out: dict[str, F64] = {}
    for s in schema.SERIES:
        grid, out[s.name] = resample(end_s, np.asarray(cols[s.column]), step_seconds, until_s, s.combine)
    return grid, out


def history_from_store(
    store: Store,
    now_ms: int,
    step_seconds: float,
    steps: int,
    host: str = "",
    resources: tuple[str, ...] = schema.RESOURCES,
) -> SeriesBatch:
    """Every workload's last `steps` steps ending at now, from the store. Steps with no sample are NaN; the
    features treat them as unknown. The batch's step is `step_seconds` rounded to whole seconds."""
    since_ms = now_ms - int(steps * step_seconds * 1000)
    now_s = now_ms / 1000.0
    keys, values, signals = [], [], []
    for (h, w), cols in sorted(store.resource_series(since_ms=since_ms, host=host).items()):
        if not cols["end_ms"]:
            continue
        _, grids = resample_workload(cols, step_seconds, until_s=now_s)
        keys.append(f"{h}/{w}")
        values.append([_last_steps(grids[r], steps) for r in resources])
        signals.append([_last_steps(grids[s], steps) for s in schema.SIGNALS])
    n = len(keys)
    origin = math.ceil(now_s / step_seconds) * float(step_seconds)
    return SeriesBatch(
        keys=tuple(keys),
        origin_ts=np.full(n, origin),
        step_seconds=max(1, round(step_seconds)),
        values=np.asarray(values, dtype=np.float64).reshape(n, len(resources), steps),
        signals=np.asarray(signals, dtype=np.float64).reshape(n, len(schema.SIGNALS), steps),
        resources=resources,
    )


def series_from_store(
    columns: dict[tuple[str, str], Columns], step_seconds: int, min_steps: int = 1
) -> list[Series]:
    """The store's samples (`Store.resource_series`) as one series per workload and resource, named
    host/workload/resource, with the request-rate signals riding along. Steps with no sample are filled from
    the previous one (the agent was away; the workload most likely did what it did before)."""
    out = []
    for (host, workload), cols in sorted(columns.items()):
        if not cols["end_ms"]:
            continue
        grid, grids = resample_workload(cols, step_seconds)
        sigs = np.stack([grids[s] for s in schema.SIGNALS]) if schema.SIGNALS else None
        for resource in schema.RESOURCES:
            v = grids[resource]
            if int((~np.isnan(v)).sum()) < min_steps:
                continue
            out.append(
                Series(
                    name=f"{host}/{workload}/{resource}",
                    timestamps=grid.astype(np.int64),
                    values=fill_unknown(v[None, :])[0],
                    step_seconds=step_seconds,
                    signals=sigs,
                )
            )
    return out


def _last_steps(v: F64, steps: int) -> F64:
    """The last `steps` values, NaN-padded in front when there are fewer."""
    out = np.full(steps, np.nan)
    k = min(steps, len(v))
    if k:
        out[-k:] = v[-k:]
    return out
