"""Train -> file -> onnxruntime gives the trainer's numbers; the network's gradients are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.predict.model import load_model
from training import net
from training.backtest import forecast_origins
from training.traces import Trace
from training.train import NumpyForecaster, TrainedModel, series_from_trace, train_model


def test_onnx_file_gives_the_trainers_numbers(
    tiny_model: TrainedModel, tiny_model_path: Path, traces: list[Trace]
) -> None:
    served = load_model(tiny_model_path)
    trainer = NumpyForecaster(tiny_model)
    for t in traces:
        a = forecast_origins(served, t)
        b = forecast_origins(trainer, t)
        assert a.shape == (len(t), tiny_model.spec.horizon, len(tiny_model.quantiles))
        # float32 weights in the file vs float64 in the trainer: agree to ~1e-6 of the series' scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(t.values).mean()))


def test_raw_network_output_matches_on_extreme_inputs(
    tiny_model: TrainedModel, tiny_model_path: Path
) -> None:
    served = load_model(tiny_model_path)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 10, size=(500, tiny_model.spec.n_features)).astype(np.float32)
    x[:10] = 45.0  # beyond anything the squash lets through
    got = served.run(x)
    want = net.forward(tiny_model.params, x, tiny_model.spec.horizon, len(tiny_model.quantiles))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (np.diff(got, axis=2) >= 0).all(), "quantiles must not cross"


def test_metadata_describes_the_model(
    tiny_model: TrainedModel, tiny_model_path: Path, tiny_settings: net.TrainSettings
) -> None:
    info = load_model(tiny_model_path).info
    assert info.version == tiny_model.version and info.format_version == "1"
    assert info.quantiles == tiny_model.quantiles and 0.5 in info.quantiles and info.quantiles[-1] >= 0.99
    assert info.horizon == tiny_model.spec.horizon and info.spec == tiny_model.spec
    assert info.step_seconds == 300 and info.resources == ("cpu", "memory", "io")
    assert info.training_data["series"] == ["nab_ec2_cpu_5f5533_3d", "nab_rds_cpu_cc0c53_3d"]
    trainer = json.loads(info.extra["trainer"])
    assert trainer["hidden"] == tiny_settings.hidden and trainer["epochs"] == tiny_settings.epochs


def test_training_is_deterministic_and_learns(traces: list[Trace], tiny_settings: net.TrainSettings) -> None:
    series = [series_from_trace(t) for t in traces]
    a = train_model(series, "t", settings=tiny_settings)
    b = train_model(series, "t", settings=tiny_settings)
    assert a.version == b.version
    for k, v in a.params.arrays().items():
        np.testing.assert_array_equal(v, b.params.arrays()[k])
    untrained = train_model(series, "t", settings=net.TrainSettings(hidden=8, epochs=1, learning_rate=1e-12))
    assert a.train_loss < 0.9 * untrained.train_loss


def test_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(2)
    n_in, hidden, horizon, q = 5, 4, 2, (0.1, 0.5, 0.9)
    p = net.init_params(n_in, hidden, horizon, len(q), rng)
    p.w2 = rng.normal(0, 0.5, p.w2.shape)
    p.ws = rng.normal(0, 0.5, p.ws.shape)
    x = rng.normal(size=(16, n_in))
    y = rng.normal(size=(16, horizon)) * 2
    w = rng.uniform(0.5, 2, 16)
    qa = np.asarray(q)
    _, grads = net._grads(p, x, y, w, qa, horizon)
    eps = 1e-6
    for name, g in grads.items():
        arr = getattr(p, name)
        for idx in list(np.ndindex(arr.shape))[:6]:
            old = arr[idx]
            arr[idx] = old + eps
            up = net._grads(p, x, y, w, qa, horizon)[0]
            arr[idx] = old - eps
            down = net._grads(p, x, y, w, qa, horizon)[0]
            arr[idx] = old
            assert g[idx] == pytest.approx((up - down) / (2 * eps), rel=1e-3, abs=1e-7), f"{name}{idx}"
