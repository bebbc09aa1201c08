"""Stored telemetry as series on one step grid: what the engine forecasts from and what training learns from.

The store keeps irregular samples (one per agent interval); the model works in steps. Training and the
champion/challenger read the store's columns here and resample them (`controller.telemetry_schema`: which
columns, and how samples combine in a step):

    series = series_from_store(store.resource_series(...), step)       # training, champion/challenger

The scaling cycle forecasts from `step_history.StepHistory`, the same steps kept in memory as telemetry
arrives (binned and combined the same way; tests/predict/test_step_history.py pins that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller import telemetry_schema as schema
from controller.predict.features import fill_unknown, resample

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
    # (N, len(SIGNALS), the last steps) request-rate series, NaN = not captured; they may cover fewer steps
    # than the values (the model reads only its recent window of them), aligned at the end
    signals: F64 | None = None
    resources: tuple[str, ...] = schema.RESOURCES
    # the spacing of origin_ts's grid when it is not step_seconds: a lab that compresses time feeds the model
    # one short grid step for each of its own (0: step_seconds)
    grid_seconds: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.values.ndim != 3 or self.values.shape[:2] != (n, len(self.resources)):
            raise ValueError(
                f"values must be (workloads, resources, steps) = ({n}, {len(self.resources)}, steps), "
                f"got {self.values.shape}"
            )
        if self.origin_ts.shape != (n,):
            raise ValueError(f"origin_ts must have one entry per workload ({n}), got {self.origin_ts.shape}")
        sig = self.signals
        if sig is not None and (sig.ndim != 3 or sig.shape[:2] != (n, len(schema.SIGNALS))):
            raise ValueError(f"signals must be ({n}, {len(schema.SIGNALS)}, steps), got {sig.shape}")
        if sig is not None and sig.shape[2] > self.values.shape[2]:
            raise ValueError(
                f"signals have {sig.shape[2]} steps, more than the values' {self.values.shape[2]}"
            )


def resample_workload(
    cols: Columns, step_seconds: float, until_s: float | None = None
) -> tuple[F64, dict[str, F64]]:
    """One workload's stored columns on the step grid: (step end times, values of every series by name),
    each step the mean or max of its samples as the schema says; NaN for steps without a sample."""
    end_s = np.asarray(cols["end_ms"], dtype=np.float64) / 1000.0
    # compacted steps stand for their samples (a store without the column: one sample per row)
    weights = np.asarray(cols["weight"], dtype=np.float64) if "weight" in cols else None
    grid = np.zeros(0)
    out: dict[str, F64] = {}
    for s in schema.SERIES:
        grid, out[s.name] = resample(
            end_s, np.asarray(cols[s.column]), step_seconds, until_s, s.combine, weights
        )
    return grid, out


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
