"""The controller's side of prediction: one object, one batched forecast per control-loop cycle.

    engine = PredictionEngine()                       # the packaged model, or the fallback if unusable
    batch = history_from_store(store, now_ms, engine.step_seconds, engine.history_steps)  # predict.series
    fc = engine.forecast(batch)                       # curves (workloads, resources, horizon, quantiles)
    fc.curve("host-a/web", "cpu")                     # (horizon, quantiles) in cores

A model that is missing, corrupt or does not match this controller never stops the loop: the engine logs
why and forecasts with the statistical fallback; `engine.source` and `engine.reason` say which is in use.
A newly trained model replaces the running one only through `consider` (champion/challenger).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from controller.predict.champion import ChampionDecision, decide_champion, recent_loss
from controller.predict.fallback import StatisticalForecaster
from controller.predict.features import Periods, detect_periods, period_slots, refresh_steps
from controller.predict.model import (
    DEFAULT_MODEL,
    Forecaster,
    ModelError,
    OnnxForecaster,
    load_model,
    load_model_bytes,
)
from controller.predict.series import Series, SeriesBatch

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
DEFAULT_STEP_SECONDS = 300
# Periods drift slowly and detecting them costs as much as the rest of featurisation: once an hour per row.
PERIOD_REFRESH_SECONDS = 3600.0


@dataclass(frozen=True)
class Forecast:
    keys: tuple[str, ...]
    resources: tuple[str, ...]
    quantiles: tuple[float, ...]
    step_seconds: int
    origin_ts: F64
    curves: F64  # (workloads, resources, horizon, quantiles), in each resource's own units
    source: str  # "model" or "fallback"
    model_version: str
    reason: str  # why the fallback is in use ("" for the model)

    def curve(self, key: str, resource: str) -> F64:
        """(horizon, quantiles) for one workload's resource."""
        return np.asarray(self.curves[self.keys.index(key), self.resources.index(resource)])

    def at_quantile(self, q: float) -> F64:
        """(workloads, resources, horizon) at one of the model's quantiles."""
        if q not in self.quantiles:
            raise KeyError(f"quantile {q} is not one of {list(self.quantiles)}")
        return np.asarray(self.curves[..., self.quantiles.index(q)])


class PredictionEngine:
    def __init__(
        self,
        model_path: str | Path | None = DEFAULT_MODEL,
        period_refresh_seconds: float = PERIOD_REFRESH_SECONDS,
        threads: int = 0,
    ) -> None:
        self.fallback = StatisticalForecaster()
        self.forecaster: Forecaster = self.fallback
        self.source = "fallback"
        self.reason = "no model loaded"
        self.threads = threads
        self.period_refresh_seconds = period_refresh_seconds
        # (rows, slot, lag, log error) of the last batch: each row's cycle as detected for its slot
        # (features.period_slots).
        self._period_cache: (
            tuple[tuple[tuple[str, ...], tuple[str, ...]], F64, npt.NDArray[np.int64], F64] | None
        ) = None
        if model_path is not None:
            self.load(model_path)

    def load(self, path: str | Path) -> bool:
        """Serve the model at `path`; if it is unusable, log why and serve the fallback. True if loaded."""
        try:
            model = load_model(path, self.threads)
        except ModelError as e:
            self._use_fallback(str(e))
            return False
        self._use(model)
        return True

    def _use(self, model: OnnxForecaster) -> None:
        self.forecaster, self.source, self.reason = model, "model", ""
        self._period_cache = None
        log.info("forecasting with %s", model.info.describe())

    def _use_fallback(self, reason: str) -> None:
        self.forecaster, self.source, self.reason = self.fallback, "fallback", reason
        log.warning("prediction model unusable: %s; forecasting with the statistical fallback", reason)

    @property
    def step_seconds(self) -> int:
        """The step the model was trained at: resample stored series to it."""
        if isinstance(self.forecaster, OnnxForecaster):
            return self.forecaster.info.step_seconds
        return DEFAULT_STEP_SECONDS

    @property
    def history_steps(self) -> int:
        return self.forecaster.spec.history_steps(self.step_seconds)

    @property
    def model_version(self) -> str:
        if isinstance(self.forecaster, OnnxForecaster):
            return self.forecaster.info.version
        return "fallback"

    def _periods_for(self, batch: SeriesBatch, history: F64) -> Periods:
        """Each row's cycle, from the cache where it was detected for the row's current slot; detected for
        rows that are new or whose slot has passed. The cache is arrays aligned with the last batch's rows,
        so a fleet that has not changed costs no per-row Python work."""
        rows = (batch.keys, batch.resources)
        n = len(batch.keys) * len(batch.resources)
        origin = np.repeat(batch.origin_ts.astype(np.float64), len(batch.resources))
        every = refresh_steps(self.period_refresh_seconds, batch.step_seconds)
        slot, back = period_slots(origin, batch.grid_seconds or batch.step_seconds, every)
        at, lag, err = np.full(n, np.nan), np.zeros(n, np.int64), np.zeros(n)
        c = self._period_cache
        if c is not None and c[0] == rows:  # the same fleet as last cycle: no per-row Python work
            at, lag, err = c[1].copy(), c[2].copy(), c[3].copy()
        elif c is not None:
            where = {key: i for i, key in enumerate((k, r) for k in c[0][0] for r in c[0][1])}
            for i, key in enumerate((k, r) for k in batch.keys for r in batch.resources):
                j = where.get(key)
                if j is not None:
                    at[i], lag[i], err[i] = c[1][j], c[2][j], c[3][j]
        stale = at != slot  # NaN (never detected) is stale too
        steps = history.shape[1]
        for b in np.unique(back[stale]):
            idx = np.flatnonzero(stale & (back == b))
            # the history as it was at the slot's first step: what every detection in this slot sees
            fresh = detect_periods(history[idx, : max(steps - int(b), 0)], self.forecaster.spec)
            lag[idx], err[idx] = fresh.lag, fresh.log_error
        at[stale] = slot[stale]
        self._period_cache = (rows, at, lag, err)
        return Periods(lag, err)

    def forecast(self, batch: SeriesBatch) -> Forecast:
        """One batched forecast for every workload and resource in `batch`."""
        n, r, steps = batch.values.shape
        history = batch.values.reshape(n * r, steps)
        ts = np.repeat(batch.origin_ts.astype(np.float64), r)
        # one row of signals per workload: its resources share them (the features are computed once)
        w = self.forecaster.spec.window
        signals = None if batch.signals is None else batch.signals[:, :, -w:]
        source, reason, version = self.source, self.reason, self.model_version
        try:
            curves = self.forecaster.predict_rows(
                history, ts, batch.step_seconds, signals, self._periods_for(batch, history), signal_repeat=r
            )
        except Exception as e:  # the loop must go on: any model failure falls back for this cycle
            if self.forecaster is self.fallback:
                raise
            reason = f"model {version} failed this cycle: {type(e).__name__}: {e}"
            log.error("%s; forecasting with the statistical fallback", reason)
            curves = self.fallback.predict_rows(history, ts, batch.step_seconds, signals, signal_repeat=r)
            source, version = "fallback", "fallback"
        fc = self.forecaster if source == "model" else self.fallback
        h, q = fc.horizon, len(fc.quantiles)
        return Forecast(
            keys=batch.keys,
            resources=batch.resources,
            quantiles=fc.quantiles,
            step_seconds=batch.step_seconds,
            origin_ts=batch.origin_ts,
            curves=curves.reshape(n, r, h, q),
            source=source,
            model_version=version,
            reason=reason,
        )

    def consider(
        self,
        challenger_path: str | Path,
        recent: list[Series],
        since_s: dict[str, float],
        min_improvement: float = 0.01,
    ) -> ChampionDecision:
        """Champion/challenger: score the running model and the new one on the same recent data; swap only
        if the new one is better by `min_improvement`. The decision is logged and returned."""
        d, challenger = self.judge(challenger_path, recent, since_s, min_improvement)
        if challenger is not None:
            self.adopt(challenger)
        return d

    def judge(
        self,
        challenger_path: str | Path,
        recent: list[Series],
        since_s: dict[str, float],
        min_improvement: float = 0.01,
    ) -> tuple[ChampionDecision, OnnxForecaster | None]:
        """The scoring half of `consider`, which changes nothing: the decision, and the loaded challenger if
        it should be adopted. The controller runs this (a backtest: seconds of CPU) in a thread, then
        `adopt`s on its event loop."""
        try:
            challenger = load_model(challenger_path, self.threads)
        except ModelError as e:
            d = ChampionDecision(
                False, f"challenger unusable: {e}", self.model_version, str(challenger_path), None, math.nan
            )
            log.warning("champion/challenger: %s", d.reason)
            return d, None
        champion = self.forecaster
        champion_loss = recent_loss(champion, recent, since_s) if self.source == "model" else None
        d = decide_champion(
            self.model_version,
            champion_loss,
            challenger.info.version,
            recent_loss(challenger, recent, since_s),
            min_improvement,
        )
        log.info("champion/challenger: %s", d.reason)
        return d, challenger if d.promote else None

    def adopt(self, challenger: OnnxForecaster) -> None:
        """Serve a challenger `judge` promoted."""
        self._use(challenger)


# The child process that backtests a challenger runs below the controller's priority: the event loop that
# answers lease renewals must get the CPU first on a small host.
BACKTEST_NICENESS = 10


def lower_priority() -> None:
    """A `ProcessPoolExecutor` initializer: the child gives way to the controller."""
    os.nice(BACKTEST_NICENESS)


def judge_in_child(
    champion: bytes | None,
    champion_name: str,
    challenger_path: str,
    recent: list[Series],
    since_s: dict[str, float],
    min_improvement: float = 0.01,
) -> tuple[ChampionDecision, bytes | None]:
    """`PredictionEngine.judge` in a process of its own (the controller's event loop shares no GIL with a
    backtest there): the running model comes as bytes (`champion`, None when the fallback runs), since its
    file may already hold the challenger. Returns the decision and the challenger's bytes if promoted."""
    engine = PredictionEngine(None, threads=1)
    if champion is not None:
        engine.adopt(load_model_bytes(champion, champion_name, engine.threads))
    d, challenger = engine.judge(challenger_path, recent, since_s, min_improvement)
    return d, challenger.model_bytes if challenger is not None else None
