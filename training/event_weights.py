"""Learning from events: which windows of history weigh more in the next training (failovers and the hour
before them, forecasts that were badly wrong). Pure functions; the callers log what they found.

Whether the model trained that way may replace the running one is `controller.predict.champion`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from training.traces import parse_timestamp

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
KINDS = ("failover", "forecast_miss")


@dataclass(frozen=True)
class Event:
    kind: str  # "failover" or "forecast_miss"
    series: str  # the workload (or trace) it concerns; "" = every series
    start_s: float
    end_s: float


@dataclass(frozen=True)
class EventWeighting:
    """Training weight of the windows around events, relative to 1 for ordinary steps."""

    failover: float = 4.0
    forecast_miss: float = 2.0
    # A failover's lead-in is what a forecast should have seen coming: weigh the hour before it too.
    failover_lead_in_seconds: float = 3600.0
    miss_pad_seconds: float = 900.0


def event_weights(
    timestamps: I64, events: list[Event], series: str, weighting: EventWeighting = EventWeighting()
) -> F64:
    """Per-step weights for one series: 1, or the largest weight of any event window covering the step."""
    ts = np.asarray(timestamps, dtype=np.float64)
    w = np.ones(len(ts))
    for e in events:
        if e.series and e.series != series:
            continue
        if e.kind == "failover":
            lo, hi, k = e.start_s - weighting.failover_lead_in_seconds, e.end_s, weighting.failover
        elif e.kind == "forecast_miss":
            lo, hi, k = (
                e.start_s - weighting.miss_pad_seconds,
                e.end_s + weighting.miss_pad_seconds,
                weighting.forecast_miss,
            )
        else:
            raise ValueError(f"unknown event kind {e.kind!r}; known: {', '.join(KINDS)}")
        inside = (ts >= lo) & (ts <= hi)
        w[inside] = np.maximum(w[inside], k)
    return w


def find_forecast_misses(
    series: str,
    timestamps: I64,
    usage: F64,
    lower: F64,
    upper: F64,
    scale: F64,
    tolerance: float = 3.0,
    merge_seconds: float = 1800.0,
) -> list[Event]:
    """Windows where a forecast was badly wrong: usage outside [lower, upper] (the outermost quantiles) by
    more than `tolerance` scale units. Misses closer than `merge_seconds` become one window. NaN forecasts
    (no forecast yet) never count."""
    ts = np.asarray(timestamps, dtype=np.float64)
    excess = np.maximum(usage - upper, lower - usage)
    bad = np.nan_to_num(excess, nan=-np.inf) > tolerance * np.asarray(scale)
    out: list[Event] = []
    for t in ts[bad]:
        if out and t - out[-1].end_s <= merge_seconds:
            out[-1] = Event("forecast_miss", series, out[-1].start_s, float(t))
        else:
            out.append(Event("forecast_miss", series, float(t), float(t)))
    return out


def load_events(path: str | Path) -> list[Event]:
    """Events from a JSON file: a list of {"kind", "series" (optional), "start", "end"} with times as ISO
    text or unix seconds. Errors name the entry and the field."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: events file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a readable JSON file: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of events")
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ValueError(f"{p}: entry {i}: expected an object")
        kind = d.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{p}: entry {i}: kind {kind!r} must be one of {', '.join(KINDS)}")
        times = []
        for key in ("start", "end"):
            v = d.get(key)
            try:
                times.append(float(v) if isinstance(v, int | float) else float(parse_timestamp(str(v))))
            except (ValueError, TypeError):
                raise ValueError(f"{p}: entry {i}: {key} {v!r} is not a time") from None
        if times[1] < times[0]:
            raise ValueError(f"{p}: entry {i}: end is before start")
        out.append(Event(str(kind), str(d.get("series", "")), times[0], times[1]))
    return out


def failover_events_from_records(
    records: list[tuple[str, str, int, dict[str, str]]], workload_of: dict[tuple[str, str], str]
) -> list[Event]:
    """Failover windows from the controller's event log: (kind, service, unix_ms, detail) rows. The series
    is the failed owner's workload of that service (`workload_of[(host, service)]`), or every series when
    that is unknown; the window is the takeover itself (its lead-in is added by `event_weights`)."""
    out = []
    for kind, service, unix_ms, detail in records:
        if kind not in ("failover-complete", "move-complete"):
            continue
        old = detail.get("old_owner", "")
        workload = workload_of.get((old, service), "")
        t = unix_ms / 1000.0
        if not workload:
            out.append(Event("failover", "", t, t))
            continue
        # training series are named host/workload/resource (train.series_from_store)
        out.extend(Event("failover", f"{old}/{workload}/{r}", t, t) for r in ("cpu", "memory", "io"))
    return out
