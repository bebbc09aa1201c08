"""A missing, corrupt or mismatched model file: a clear error, and the engine falls back and keeps going."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from controller.predict.engine import PredictionEngine
from controller.predict.model import ModelError, load_model
from controller.predict.series import SeriesBatch

BAD_CASES = ["missing", "garbage", "truncated", "not_ours", "old_format", "other_features", "wrong_width"]


def _edit_meta(src: Path, dst: Path, **changes: str) -> Path:
    m = onnx.load(str(src))
    for p in m.metadata_props:
        if p.key in changes:
            p.value = changes[p.key]
    onnx.save(m, str(dst))
    return dst


def make_bad(kind: str, good: Path, tmp: Path) -> tuple[Path, str]:
    """A bad model file and a phrase its error must contain."""
    p = tmp / f"{kind}.onnx"
    if kind == "missing":
        return p, "model file not found"
    if kind == "garbage":
        p.write_bytes(b"this is not a protobuf \x00\xff" * 10)
        return p, "not a readable ONNX model"
    if kind == "truncated":
        p.write_bytes(good.read_bytes()[:200])
        return p, "not a readable ONNX model"
    if kind == "not_ours":
        g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "other",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
        return p, "not a Shadowplane prediction model"
    if kind == "old_format":
        return _edit_meta(good, p, format_version="0"), "model format '0'"
    if kind == "other_features":
        return _edit_meta(good, p, feature_names='["a", "b"]'), "features this controller does not build"
    if kind == "wrong_width":
        m = onnx.load(str(good))
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
        onnx.save(m, str(p))
        return p, "not a readable ONNX model"  # onnxruntime itself rejects the inconsistent graph
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", BAD_CASES)
def test_bad_model_file_gets_a_clear_error(kind: str, tiny_model_path: Path, tmp_path: Path) -> None:
    path, phrase = make_bad(kind, tiny_model_path, tmp_path)
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert phrase in str(e.value)
    assert str(path) in str(e.value), "the error names the file"
    assert "train" in str(e.value) or "copy" in str(e.value), "the error says how to fix it"


def _batch(n: int = 4, steps: int = 290) -> SeriesBatch:
    rng = np.random.default_rng(0)
    values = np.abs(rng.normal(5, 1, size=(n, 3, steps)))
    values[0, :, :200] = np.nan  # a new workload
    return SeriesBatch(
        keys=tuple(f"h/w{i}" for i in range(n)),
        origin_ts=np.full(n, 1.7e9),
        step_seconds=300,
        values=values,
    )


@pytest.mark.parametrize("kind", BAD_CASES)
def test_engine_falls_back_on_a_bad_model_and_says_why(
    kind: str, tiny_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, phrase = make_bad(kind, tiny_model_path, tmp_path)
    with caplog.at_level(logging.WARNING, logger="controller.predict.engine"):
        engine = PredictionEngine(path)
    assert engine.source == "fallback" and phrase in engine.reason
    assert any("statistical fallback" in r.message and phrase in r.message for r in caplog.records)
    fc = engine.forecast(_batch())
    assert fc.source == "fallback" and fc.curves.shape == (4, 3, 6, len(fc.quantiles))
    assert np.isfinite(fc.curves).all()
    assert (np.diff(fc.curves, axis=-1) >= 0).all()


def test_engine_serves_a_good_model_and_a_later_good_file_replaces_the_fallback(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    engine = PredictionEngine(tmp_path / "not-yet.onnx")
    assert engine.source == "fallback"
    shutil.copy(tiny_model_path, tmp_path / "now.onnx")
    assert engine.load(tmp_path / "now.onnx")
    fc = engine.forecast(_batch())
    assert fc.source == "model" and fc.model_version == engine.model_version != "fallback"
    assert fc.curve("h/w1", "memory").shape == (6, len(fc.quantiles))
    assert np.isfinite(fc.curves).all()


def test_a_model_that_fails_at_run_time_falls_back_for_that_cycle(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = PredictionEngine(tiny_model_path)

    def boom(x: object) -> object:
        raise RuntimeError("onnxruntime exploded")

    monkeypatch.setattr(engine.forecaster, "run", boom)
    with caplog.at_level(logging.ERROR, logger="controller.predict.engine"):
        fc = engine.forecast(_batch())
    assert fc.source == "fallback" and "onnxruntime exploded" in fc.reason
    assert "onnxruntime exploded" in caplog.text
    assert engine.source == "model", "one bad cycle does not unload the model"
