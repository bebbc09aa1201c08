"""Reading a trace: CSV `timestamp,value` (the NAB format), one evenly spaced series.

Errors name the file, the line and what is wrong, so `shadowctl backtest` can print them as they are.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

# Fewer rows than this cannot hold a warm-up day plus anything to score, whatever the step.
MIN_ROWS = 16


class TraceError(ValueError):
    """A trace file that cannot be used: the message says which file, where, and what is wrong."""


@dataclass(frozen=True)
class Trace:
    name: str
    timestamps: npt.NDArray[np.int64]  # unix seconds, one per row
    values: npt.NDArray[np.float64]

    @property
    def step_seconds(self) -> int:
        """The typical spacing of rows (the median, so a few gaps do not change it)."""
        return int(np.median(np.diff(self.timestamps)))

    @property
    def irregular_rows(self) -> int:
        """Rows not one step after the previous one. Real traces have them (NAB's repeat an hour of
        timestamps at a clock change); the replay goes row by row, so they only shift calendar features."""
        return int(np.sum(np.diff(self.timestamps) != self.step_seconds))

    def __len__(self) -> int:
        return len(self.values)


def parse_timestamp(text: str) -> int:
    """Unix seconds from an ISO-8601 time; a time without a zone is taken as UTC (as NAB's are)."""
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def load_trace(path: str | Path, min_rows: int = MIN_ROWS) -> Trace:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TraceError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a CSV file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read: {e}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise TraceError(f"{path}: empty file; expected a header `timestamp,value` and one row per step")
    header = [c.strip().lower() for c in rows[0]]
    if header != ["timestamp", "value"]:
        raise TraceError(f"{path}: line 1: header is {','.join(rows[0])!r}; expected 'timestamp,value'")
    ts: list[int] = []
    vs: list[float] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise TraceError(f"{path}: line {lineno}: {len(row)} columns; expected 2 (timestamp,value)")
        try:
            t = parse_timestamp(row[0])
        except ValueError:
            raise TraceError(
                f"{path}: line {lineno}: timestamp {row[0]!r} is not a time (e.g. 2014-02-14 14:30:00)"
            ) from None
        try:
            v = float(row[1])
        except ValueError:
            raise TraceError(f"{path}: line {lineno}: value {row[1]!r} is not a number") from None
        if not math.isfinite(v):
            raise TraceError(f"{path}: line {lineno}: value {row[1]!r} is not a finite number")
        ts.append(t)
        vs.append(v)
    if len(vs) < min_rows:
        raise TraceError(f"{path}: {len(vs)} rows; at least {min_rows} are needed")
    if ts[-1] <= ts[0]:
        raise TraceError(f"{path}: the last timestamp is not after the first; rows must be in time order")
    return Trace(path.stem, np.asarray(ts, dtype=np.int64), np.asarray(vs, dtype=np.float64))


def load_trace_dir(directory: str | Path) -> list[Trace]:
    """Every `*.csv` in a directory, sorted by name (so training is reproducible)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"{directory}: not a directory of trace CSV files")
    files = sorted(directory.glob("*.csv"))
    if not files:
        raise TraceError(f"{directory}: no *.csv trace files in it")
    return [load_trace(f) for f in files]
