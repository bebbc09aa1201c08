"""The forecast's input, kept in memory: every workload's recent history on the forecast's step grid, fed
as telemetry arrives, so a scaling cycle takes a day of history for 10,000 workloads from memory in
milliseconds instead of resampling the store's ~86 million samples (a day at a 10 s interval).

Steps are binned exactly as `features.resample` bins them (a sample ending at t belongs to the step
ending at ceil(t / step) * step), and each series combines its samples as `telemetry_schema.SERIES` says
(a running mean, or the max). A step nobody reported is unknown (NaN).

Layout: one array per kind (resources; request-rate signals), (workloads, series, columns), where a column
is the same step for every workload. Resources keep as many steps as the model's features reach back (a day
and a bit), signals only the model's recent window, which is all the features read of them; each has
`SPARE_STEPS` more columns, so the window moves by one whole copy every `SPARE_STEPS` steps (8 hours at the
packaged model's 300 s) instead of a ring's per-step bookkeeping, and a cycle's cut of the whole fleet is a
view: no copy at all.

A restart does not forget: `load` fills the arrays from the store's per-step aggregates
(`Store.step_aggregates`, one SQL GROUP BY), and batches that arrive meanwhile are held and applied
afterwards only if the seed's snapshot did not contain them (their sequence number is above what the
snapshot had stored for that agent), so no sample counts twice and none is lost.

Threads: telemetry is added on the event loop; the store worker cuts and forecasts. Moving the window or
adding workloads builds new arrays (a cut in use keeps the old ones), and an add that lands during a
forecast goes into the step still open, which no cut includes, or (a late sample) into one step of the
cut, which then holds that sample or not. Neither needs a lock, which would make ingest wait for a forecast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from controller import telemetry_schema as schema
from controller.predict.series import SeriesBatch
from controller.store.base import StepAggregate, Store
from shadowplane.v1 import agent_pb2 as apb

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
# Columns beyond the steps a cut needs: the window moves by this many steps at a time.
SPARE_STEPS = 96
# The scaling cycle moves the window (off the event loop) once fewer than this many columns are left.
MOVE_AHEAD_STEPS = 12


class _Window:
    """(rows, n series, columns) of step values, column j holding step `base + j` for every row."""

    def __init__(self, steps: int, maxed: Sequence[bool], capacity: int) -> None:
        self.steps, self.columns = steps, steps + SPARE_STEPS
        self.maxed = np.asarray(maxed, dtype=bool)
        self.n = len(self.maxed)
        self.base: int | None = None  # step of column 0; None until the first value
        # Rows past `used` are never read and are set up when a workload takes them: allocations are
        # np.empty (the kernel gives pages only when written), and moves and growth copy only used rows.
        self.used = 0
        self.values = np.empty((capacity, self.n, self.columns))
        self.counts = np.zeros((capacity, self.columns), dtype=np.int32)

    def add_row(self) -> int:
        row = self.used
        if row >= len(self.values):
            values = np.empty((2 * row, self.n, self.columns))
            counts = np.zeros((2 * row, self.columns), dtype=np.int32)
            values[:row], counts[:row] = self.values, self.counts
            self.values, self.counts = values, counts
        self.values[row] = np.nan
        self.counts[row] = 0
        self.used = row + 1
        return row

    def room(self, open_step: int) -> int:
        """Columns left after `open_step` before the window must move."""
        return self.columns if self.base is None else self.columns - 1 - (open_step - self.base)

    def move_for(self, open_step: int) -> None:
        """Move the window so that `open_step` has the most room after it."""
        if self.base is not None and open_step - self.base > self.steps + 1:
            self._move(open_step - self.base - self.steps - 1)

    def _column(self, step: int) -> int:
        """The column of `step`, moving the window forward first if it is beyond the last column (new
        arrays: a cut being read keeps the old ones). Negative: older than the window holds."""
        if self.base is None:
            self.base = step - self.steps - 1
        col = step - self.base
        if col >= self.columns:
            # keep `steps` + 1 before `step` (a cut ends at the last complete step, the one before the
            # open one) and room for SPARE_STEPS - 1 more after it
            shift = col - self.steps - 1
            self._move(shift)
            col -= shift
        return col

    def _move(self, shift: int) -> None:
        assert self.base is not None
        if shift > 0:
            keep, u = max(0, self.columns - shift), self.used
            values = np.empty_like(self.values)
            counts = np.zeros_like(self.counts)
            values[:u, :, :keep] = self.values[:u, :, shift:]
            values[:u, :, keep:] = np.nan
            counts[:u, :keep] = self.counts[:u, shift:]
            self.values, self.counts, self.base = values, counts, self.base + shift

    def add(self, row: int, step: int, vals: F64) -> None:
        """Fold one sample's values into the row's `step` (a running mean, or the max)."""
        col = self._column(step)
        if col < 0:
            return  # older than the window: no forecast reads it
        c = int(self.counts[row, col])
        v = self.values[row, :, col]
        if c == 0:
            v[:] = vals
        else:
            v[:] = np.where(self.maxed, np.fmax(v, vals), v + (vals - v) / (c + 1))
        self.counts[row, col] = c + 1

    def load(self, row: int, steps: I64, counts: I64, vals: F64) -> None:
        """Set an empty row's steps from per-step aggregates (steps ascending)."""
        if not len(steps):
            return
        self._column(int(steps[-1]))
        assert self.base is not None
        cols = steps - self.base
        keep = (cols >= 0) & (cols < self.columns)
        self.counts[row, cols[keep]] = counts[keep]
        self.values[row][:, cols[keep]] = vals[:, keep]

    def cut(self, rows: I64 | slice, last_step: int, steps: int) -> F64:
        """(rows, n, steps): the steps ending with `last_step`, oldest first, NaN where unknown. A read-only
        view when `rows` is a slice and the window holds all the steps (the usual case)."""
        values = self.values[rows]
        lo = last_step - steps + 1 - (self.base if self.base is not None else last_step + 1)
        if lo >= 0 and lo + steps <= self.columns:
            out = values[:, :, lo : lo + steps]
            out.flags.writeable = False
            return np.asarray(out)
        out = np.full((len(values), self.n, steps), np.nan)
        a, b = max(lo, 0), min(lo + steps, self.columns)
        if a < b:
            out[:, :, a - lo : b - lo] = values[:, :, a:b]
        return out

    def known(self, last_step: int, steps: int) -> npt.NDArray[np.bool_]:
        """Rows with at least one sample in the steps ending with `last_step`."""
        if self.base is None:
            return np.zeros(len(self.counts), dtype=bool)
        lo = max(0, last_step - steps + 1 - self.base)
        hi = min(self.columns, last_step + 1 - self.base)
        return (
            np.asarray((self.counts[:, lo:hi] > 0).any(axis=1))
            if lo < hi
            else np.zeros(len(self.counts), bool)
        )


class StepHistory:
    """Every workload's last `steps` steps of `step_seconds` (and `signal_steps` of the signals)."""

    def __init__(self, step_seconds: float, steps: int, signal_steps: int, capacity: int = 64) -> None:
        if step_seconds <= 0 or steps < 1 or signal_steps < 1:
            raise ValueError(
                f"step {step_seconds} s, {steps} steps, {signal_steps} signal steps: must be > 0"
            )
        self.step_seconds, self.steps, self.signal_steps = float(step_seconds), steps, signal_steps
        self.rows: dict[str, int] = {}
        self._res = [i for i, s in enumerate(schema.SERIES) if s.kind == "resource"]
        self._sig = [i for i, s in enumerate(schema.SERIES) if s.kind == "signal"]
        maxed = [s.combine == "max" for s in schema.SERIES]
        self.resources = _Window(steps, [maxed[i] for i in self._res], capacity)
        self.signals = _Window(signal_steps, [maxed[i] for i in self._sig], capacity)
        self._seeding = self._holding = False
        self._held: list[tuple[str, str, apb.TelemetryBatch, int]] = []
        # the last `batch(keys=...)`: (keys, their rows, their names, workloads known then)
        self._picked: tuple[tuple[str, ...], I64, tuple[str, ...], int] | None = None

    @property
    def step_ms(self) -> int:
        return max(1, round(self.step_seconds * 1000))

    def step_of(self, end_ms: int) -> int:
        """The step a sample ending at `end_ms` belongs to: ceil(end / step), as `features.resample` and
        `Store.step_aggregates` bin it (in whole milliseconds, so all three agree exactly)."""
        return -(-int(end_ms) // self.step_ms)

    def _row(self, key: str) -> int:
        row = self.rows.get(key)
        if row is None:
            row = self.resources.add_row()
            self.signals.add_row()
            self.rows[key] = row
        return row

    # ---- feeding ----

    def add_batch(self, host: str, instance_id: str, batch: apb.TelemetryBatch, now_ms: int) -> None:
        """A telemetry batch the store has just accepted (not a duplicate it refused), at `now_ms`. A
        sample from beyond the step after now's (an agent's clock running ahead) is left out: it would move
        the whole fleet's window past the steps the forecast needs."""
        if self._seeding or self._holding:
            self._held.append((host, instance_id, batch, now_ms))
            return
        newest = self.step_of(now_ms) + 1
        for s in batch.samples:
            step = self.step_of(s.end_unix_ms)
            if step > newest:
                continue
            vals = np.array([float(x) for x in schema.values(s)])
            row = self._row(f"{host}/{s.workload}")
            self.resources.add(row, step, vals[self._res])
            self.signals.add(row, step, vals[self._sig])

    # ---- moving the window off the event loop ----

    def needs_move(self, now_ms: int) -> bool:
        """Is the window close enough to its end that the next cycle should move it (`move_ahead`), rather
        than the first sample past the end moving it in ingest, on the event loop?"""
        open_step = self.step_of(now_ms) + 1
        return min(self.resources.room(open_step), self.signals.room(open_step)) < MOVE_AHEAD_STEPS

    def hold(self) -> None:
        """On the thread that adds (the event loop): from now until `release`, batches wait, so another
        thread may `move_ahead` (copy the arrays) without an add landing in a cell already copied."""
        if self._seeding:
            raise RuntimeError("hold() while a seed is being read: the seed holds batches already")
        self._holding = True

    def move_ahead(self, now_ms: int) -> None:
        """Between `hold` and `release`, on any thread: move both windows so the open step has the most
        room after it (the copy of the whole fleet's history: tens to hundreds of milliseconds)."""
        if not self._holding:
            raise RuntimeError("move_ahead() runs between hold() and release()")
        open_step = self.step_of(now_ms) + 1
        self.resources.move_for(open_step)
        self.signals.move_for(open_step)

    def release(self) -> None:
        """On the adding thread again: add what arrived meanwhile."""
        held, self._held = self._held, []
        self._holding = False
        for host, instance, batch, now_ms in held:
            self.add_batch(host, instance, batch, now_ms)

    def seed_since_ms(self, now_ms: int) -> int:
        """Where a seed at `now_ms` starts reading: just before the oldest step a cut can need."""
        return (self.step_of(now_ms) - self.steps - 1) * self.step_ms

    def begin_seed(self) -> None:
        """From now until `end_seed`, batches are held: the seed's snapshot decides which it already has."""
        self._seeding = True

    def load(
        self, aggregates: dict[tuple[str, str], StepAggregate], now_ms: int, first: Sequence[str] = ()
    ) -> None:
        """Fill the arrays from the store's per-step aggregates, between `begin_seed` and `end_seed`. May
        run in another thread than `add_batch`: nothing is added meanwhile (batches are held). The
        workloads in `first` (those the cycle forecasts) take the first rows, in that order: cutting them
        is then a view, no copy."""
        if not self._seeding or self.rows:
            raise RuntimeError("load() fills an empty history between begin_seed() and end_seed()")
        newest = self.step_of(now_ms) + 1
        rank = {k: i for i, k in enumerate(first)}
        order = sorted(
            aggregates.items(), key=lambda kv: (rank.get(f"{kv[0][0]}/{kv[0][1]}", len(rank)), kv[0])
        )
        for (host, workload), agg in order:
            keep = agg.steps <= newest
            steps, counts, vals = agg.steps[keep], agg.counts[keep], agg.values[:, keep]
            row = self._row(f"{host}/{workload}")
            self.resources.load(row, steps, counts, vals[self._res])
            self.signals.load(row, steps, counts, vals[self._sig])

    def end_seed(self, stored_seq: dict[tuple[str, str], int]) -> None:
        """Apply the batches held since `begin_seed` that the seed's snapshot did not have (`stored_seq`:
        (host, instance) -> the last sequence number that snapshot held)."""
        held, self._held = self._held, []
        self._seeding = False
        for host, instance, batch, now_ms in held:
            if batch.seq > stored_seq.get((host, instance), 0):
                self.add_batch(host, instance, batch, now_ms)

    def seed(
        self,
        aggregates: dict[tuple[str, str], StepAggregate],
        stored_seq: dict[tuple[str, str], int],
        now_ms: int,
    ) -> None:
        """`begin_seed`, `load` then `end_seed`, in one thread."""
        self.begin_seed()
        self.load(aggregates, now_ms)
        self.end_seed(stored_seq)

    # ---- cutting ----

    def _names(self, rows: I64) -> tuple[str, ...]:
        names = list(self.rows)
        return tuple(names[r] for r in rows)

    def batch(self, until_ms: int, keys: Iterable[str] | None = None) -> SeriesBatch:
        """The last `steps` steps ending with the step holding `until_ms`, for `keys` (default: every
        workload with a sample in them), in the order the history first saw them, as the engine forecasts
        them. Unknown steps are NaN. Read-only: for the whole fleet it is a view of the history."""
        last = self.step_of(until_ms)
        if keys is None:
            known = self.resources.known(last, self.steps)[: len(self.rows)]
            rows = np.flatnonzero(known)
            names = self._names(rows)
        else:
            # The same workloads cycle after cycle: their rows are looked up once (10,000 are milliseconds).
            asked = tuple(keys)
            if self._picked is None or self._picked[0] != asked or self._picked[3] != len(self.rows):
                found = np.array([self.rows[k] for k in set(asked) if k in self.rows], dtype=np.int64)
                found.sort()
                self._picked = (asked, found, self._names(found), len(self.rows))
            _, rows, names, _ = self._picked
        n = len(rows)
        prefix = n == 0 or int(rows[-1]) == n - 1  # rows 0..n-1 (sorted, distinct): a view
        pick = np.s_[:n] if prefix else rows
        return SeriesBatch(
            keys=names,
            origin_ts=np.full(n, last * self.step_ms / 1000.0),
            step_seconds=max(1, round(self.step_seconds)),
            values=self.resources.cut(pick, last, self.steps),
            signals=self.signals.cut(pick, last, self.signal_steps),
        )


def history_from_store(
    store: Store, until_ms: int, step_seconds: float, steps: int, signal_steps: int | None = None
) -> SeriesBatch:
    """Every workload's last `steps` steps ending with the step holding `until_ms`, from the store alone:
    a `StepHistory` seeded from it and cut (what a restarted controller forecasts from)."""
    h = StepHistory(step_seconds, steps, signal_steps or steps)
    h.seed(*store.step_aggregates(h.seed_since_ms(until_ms), h.step_ms), until_ms)
    return h.batch(until_ms)
