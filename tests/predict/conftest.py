"""Fixtures for the Prediction Engine tests: small NAB slices and a tiny model trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.predict.net import TrainSettings
from controller.predict.traces import Trace, load_trace, load_trace_dir
from controller.predict.train import TrainedModel, series_from_trace, train_model

DATA = Path(__file__).resolve().parents[1] / "data"
# Tiny but real: enough to learn something, fast enough for CI.
TINY = TrainSettings(hidden=8, epochs=2, batch=256, seed=1)


@pytest.fixture(scope="session")
def tiny_settings() -> TrainSettings:
    return TINY


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def traces() -> list[Trace]:
    return load_trace_dir(DATA)


@pytest.fixture(scope="session")
def periodic_trace() -> Trace:
    return load_trace(DATA / "nab_ec2_cpu_5f5533_3d.csv")


@pytest.fixture(scope="session")
def tiny_model(traces: list[Trace]) -> TrainedModel:
    return train_model([series_from_trace(t) for t in traces], "tests/data", settings=TINY)


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    tiny_model.save(path)
    return path
