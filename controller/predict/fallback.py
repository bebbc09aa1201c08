"""The forecaster used when there is no usable model: simple, robust, nothing to load.

For each horizon step h, the forecast distribution is the last value plus the empirical distribution of
h-step changes over the recent past ("the next 15 minutes will move like the last half-day's 15-minute
moves did"). It is monotone in q by construction, needs no training, copes with any unit, and its width
follows the series' own volatility. It ignores daily cycles and periodic jobs, which is what the model is
for; the allocation's online calibration keeps its coverage honest either way.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from controller.predict.features import FeatureSpec, Periods, fill_unknown
from controller.predict.model import DEFAULT_QUANTILES

F64 = npt.NDArray[np.float64]
DEFAULT_SPEC = FeatureSpec()


class StatisticalForecaster:
    name = "statistical fallback"

    def __init__(
        self,
        quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
        spec: FeatureSpec = DEFAULT_SPEC,
        lookback: int = 144,
    ) -> None:
        self.quantiles = quantiles
        self.spec = spec
        self.horizon = spec.horizon
        self.lookback = lookback

    def predict_rows(
        self,
        history: F64,
        origin_ts: F64,
        step_seconds: float,
        signals: F64 | None = None,
        periods: Periods | None = None,
        signal_repeat: int = 1,
    ) -> F64:
        history = np.asarray(history, dtype=np.float64)
        rows, steps = history.shape
        known = ~np.isnan(history)
        h = fill_unknown(history)
        last = h[:, -1]
        n = min(steps, self.lookback + self.horizon)
        w = h[:, -n:]
        q = np.asarray(self.quantiles)
        out = np.empty((rows, self.horizon, len(q)))
        for k in range(1, self.horizon + 1):
            if n > k:
                changes = np.sort(w[:, k:] - w[:, :-k], axis=1)
                pos = q * (changes.shape[1] - 1)
                lo = np.floor(pos).astype(int)
                hi = np.minimum(lo + 1, changes.shape[1] - 1)
                frac = pos - lo
                out[:, k - 1, :] = changes[:, lo] * (1 - frac) + changes[:, hi] * frac
            else:
                out[:, k - 1, :] = 0.0
        out += last[:, None, None]
        # Usage cannot go below zero; a series that has never been negative will not start now.
        nonneg = np.where(known, h, 0.0).min(axis=1) >= 0
        out[nonneg] = np.maximum(out[nonneg], 0.0)
        return out
