"""Champion/challenger: a new model replaces the running one only if it forecasts recent data better."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest

from controller.predict.champion import decide_champion
from controller.predict.engine import PredictionEngine
from training.traces import Trace
from training.train import series_from_trace, split_recent


def test_champion_challenger_decisions_and_reasons() -> None:
    d = decide_champion("old", 0.100, "new", 0.090)
    assert d.promote and "beats" in d.reason and "-10.0%" not in d.reason and "+10.0%" in d.reason
    d = decide_champion("old", 0.100, "new", 0.0995)
    assert not d.promote and "keeping the champion" in d.reason
    d = decide_champion("old", 0.100, "new", 0.120)
    assert not d.promote
    assert decide_champion("fallback", None, "new", 0.3).promote
    d = decide_champion("old", 0.1, "new", math.nan)
    assert not d.promote and "no finite loss" in d.reason


def test_engine_swaps_only_for_a_better_challenger_and_logs_why(
    tiny_model_path: Path, traces: list[Trace], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    series = [series_from_trace(t) for t in traces]
    _, since = split_recent(series, 12 * 3600)
    engine = PredictionEngine(tmp_path / "none.onnx")  # on the fallback
    with caplog.at_level(logging.INFO, logger="controller.predict.engine"):
        d = engine.consider(tiny_model_path, series, since)
    assert d.promote and engine.source == "model" and "champion/challenger" in caplog.text
    # the same model again cannot beat itself
    shutil.copy(tiny_model_path, tmp_path / "same.onnx")
    d = engine.consider(tmp_path / "same.onnx", series, since)
    assert not d.promote and d.champion_loss == pytest.approx(d.challenger_loss)
    (tmp_path / "broken.onnx").write_bytes(b"nope")
    d = engine.consider(tmp_path / "broken.onnx", series, since)
    assert not d.promote and "challenger unusable" in d.reason and engine.source == "model"
