"""Champion/challenger: whether a newly trained model may replace the running one.

The running controller decides it when its model file changes (`PredictionEngine.consider`), and
`shadowctl train` decides it the same way before it writes over a model: both score champion and challenger
on the same recent data with `recent_loss` and ask `decide_champion`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.predict.features import detect_periods, sliding_history
from controller.predict.model import Forecaster
from controller.predict.series import Series


@dataclass(frozen=True)
class ChampionDecision:
    promote: bool
    reason: str
    champion: str
    challenger: str
    champion_loss: float | None
    challenger_loss: float


def decide_champion(
    champion: str,
    champion_loss: float | None,
    challenger: str,
    challenger_loss: float,
    min_improvement: float = 0.01,
) -> ChampionDecision:
    """The challenger replaces the champion only if its loss on recent data is lower by at least
    `min_improvement` (relative), so a retrain that is merely as good does not churn the running model.
    Losses are mean pinball losses relative to mean usage: lower is better."""

    def d(promote: bool, reason: str) -> ChampionDecision:
        return ChampionDecision(promote, reason, champion, challenger, champion_loss, challenger_loss)

    if not math.isfinite(challenger_loss):
        return d(False, f"challenger {challenger} has no finite loss on recent data; keeping {champion}")
    if champion_loss is None or not math.isfinite(champion_loss):
        return d(True, f"no usable champion ({champion}); challenger {challenger} takes over")
    if champion_loss <= 0:
        better = challenger_loss < champion_loss
    else:
        better = challenger_loss < champion_loss * (1 - min_improvement)
    gain = (champion_loss - challenger_loss) / champion_loss if champion_loss > 0 else 0.0
    if better:
        return d(
            True,
            f"challenger {challenger} beats champion {champion} on recent data: "
            f"loss {challenger_loss:.5f} vs "
            f"{champion_loss:.5f} ({gain:+.1%})",
        )
    return d(
        False,
        f"challenger {challenger} does not beat champion {champion} by {min_improvement:.0%} on recent data: "
        f"loss {challenger_loss:.5f} vs {champion_loss:.5f} ({gain:+.1%}); keeping the champion",
    )


def recent_loss(forecaster: Forecaster, series: list[Series], since_s: dict[str, float]) -> float:
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
