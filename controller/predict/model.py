"""A prediction model file: load it, check it is one this controller can serve, run it in one batch.

Serving needs onnxruntime and numpy only. Every way a file can be unusable gets a `ModelError` that says
which file, what is wrong and what to do; the engine catches it and falls back to the statistical
forecaster.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from controller.predict.features import FeatureSpec, Periods, build_features, denormalise

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
FORMAT_VERSION = "1"
INPUT = "features"
OUTPUT = "quantiles"
DEFAULT_MODEL = Path(__file__).parent / "models" / "default.onnx"
# The quantiles `shadowctl train` fits by default and the statistical fallback forecasts.
DEFAULT_QUANTILES = (0.1, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
REQUIRED_KEYS = (
    "format_version",
    "version",
    "step_seconds",
    "window",
    "horizon",
    "quantiles",
    "features",
    "feature_names",
    "resources",
    "training_data",
)


class ModelError(Exception):
    """A model file that cannot be served: the message names the file, the problem and the fix."""


class Forecaster(Protocol):
    """Anything that turns rows of history into quantile curves: the ONNX model or the fallback."""

    name: str
    quantiles: tuple[float, ...]
    horizon: int
    spec: FeatureSpec

    def predict_rows(
        self,
        history: F64,
        origin_ts: F64,
        step_seconds: float,
        signals: F64 | None = None,
        periods: Periods | None = None,
        signal_repeat: int = 1,
    ) -> F64:
        """(rows, horizon, quantiles) in the series' own units, monotone in the last axis. `signals` has a
        row per `signal_repeat` rows of history (`features.build_features`)."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    path: str
    version: str
    format_version: str
    step_seconds: int
    horizon: int
    quantiles: tuple[float, ...]
    resources: tuple[str, ...]
    spec: FeatureSpec
    training_data: dict[str, Any]
    extra: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        series = self.training_data.get("series", [])
        return (
            f"model {self.version} ({self.path}): horizon {self.horizon} x {self.step_seconds}s, "
            f"quantiles {list(self.quantiles)}, trained on {len(series)} series"
        )


def _parse_meta(path: str, meta: dict[str, str]) -> ModelInfo:
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if "format_version" in missing:
        raise ModelError(
            f"{path}: no 'format_version' metadata: this is not a Shadowplane prediction model. "
            "Make one with `shadowctl train`, or omit --model to use the packaged default"
        )
    if meta["format_version"] != FORMAT_VERSION:
        raise ModelError(
            f"{path}: model format {meta['format_version']!r}, but this controller reads format "
            f"{FORMAT_VERSION!r}: re-train it with this version's `shadowctl train`"
        )
    if missing:
        raise ModelError(
            f"{path}: metadata is missing {', '.join(missing)}: the file is damaged or was not written by "
            "`shadowctl train`; re-train it"
        )
    where = ""
    try:
        where = "features"
        spec = FeatureSpec.from_dict(json.loads(meta["features"]))
        where = "quantiles"
        quantiles = tuple(float(q) for q in json.loads(meta["quantiles"]))
        where = "horizon"
        horizon = int(meta["horizon"])
        where = "window"
        window = int(meta["window"])
        where = "step_seconds"
        step = int(float(meta["step_seconds"]))
        where = "resources"
        resources = tuple(str(r) for r in json.loads(meta["resources"]))
        where = "feature_names"
        names = [str(n) for n in json.loads(meta["feature_names"])]
        where = "training_data"
        training = json.loads(meta["training_data"])
    except (ValueError, TypeError) as e:
        raise ModelError(f"{path}: metadata {where!r} is malformed ({e}): re-train the model") from None
    if not quantiles or any(not 0 < q < 1 for q in quantiles) or list(quantiles) != sorted(set(quantiles)):
        raise ModelError(f"{path}: quantiles {list(quantiles)} must be increasing and inside (0, 1)")
    if 0.5 not in quantiles:
        raise ModelError(f"{path}: quantiles {list(quantiles)} do not include the median 0.5")
    if horizon != spec.horizon or window != spec.window:
        raise ModelError(
            f"{path}: metadata disagrees with itself (horizon {horizon} vs {spec.horizon}, "
            f"window {window} vs "
            f"{spec.window}): the file was edited or damaged; re-train it"
        )
    if step <= 0:
        raise ModelError(f"{path}: step_seconds must be > 0, got {step}")
    if names != spec.names():
        raise ModelError(
            f"{path}: the model was trained on features this controller does not build "
            f"({len(names)} features, this version builds {spec.n_features}): re-train it with this "
            "version's `shadowctl train`"
        )
    known = {k: v for k, v in meta.items() if k not in REQUIRED_KEYS}
    return ModelInfo(
        path=path,
        version=meta["version"],
        format_version=meta["format_version"],
        step_seconds=step,
        horizon=horizon,
        quantiles=quantiles,
        resources=resources,
        spec=spec,
        training_data=training if isinstance(training, dict) else {"description": training},
        extra=known,
    )


class OnnxForecaster:
    """The trained model, served by onnxruntime: one `run` for every row of a cycle."""

    def __init__(self, session: Any, info: ModelInfo, model_bytes: bytes = b"") -> None:
        self.session = session
        self.info = info
        self.model_bytes = model_bytes  # the file as loaded (tens of KB): what a child process loads again
        self.name = f"model {info.version}"
        self.quantiles = info.quantiles
        self.horizon = info.horizon
        self.spec = info.spec

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The raw network: features (rows, F) -> normalised quantiles (rows, horizon, Q)."""
        out = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def predict_rows(
        self,
        history: F64,
        origin_ts: F64,
        step_seconds: float,
        signals: F64 | None = None,
        periods: Periods | None = None,
        signal_repeat: int = 1,
    ) -> F64:
        f = build_features(history, origin_ts, step_seconds, self.spec, signals, periods, signal_repeat)
        y = self.run(f.x)
        return denormalise(y, f.level, f.scale)


def load_model(path: str | Path, threads: int = 0) -> OnnxForecaster:
    """Load and check a model file; raise ModelError saying what is wrong and how to fix it."""
    p = Path(path)
    if not p.exists():
        raise ModelError(
            f"{p}: model file not found: train one with `shadowctl train --traces DIR --out {p}`, or omit "
            "the model option to use the packaged default"
        )
    if p.is_dir():
        raise ModelError(f"{p}: is a directory; pass the .onnx file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelError(f"{p}: cannot read the model file: {e.strerror}") from None
    return load_model_bytes(data, p, threads)


def load_model_bytes(data: bytes, p: str | Path, threads: int = 0) -> OnnxForecaster:
    """`load_model` of a file's contents (`p` names it in errors): the controller hands the running model
    to the child process that backtests a challenger this way, since its file may already be replaced."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # onnxruntime's own warnings go to stderr, not our log; errors still raise
    if threads:
        opts.intra_op_num_threads = threads
    # onnxruntime's worker threads otherwise spin between runs, taking the CPU the controller's event loop
    # (lease renewals, the HA loop) needs; a forecast batch is one run, so spinning saves nothing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for every parse failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{p}: not a readable ONNX model (corrupt or truncated file?): {first}. Re-train it or copy it "
            "again"
        ) from None
    info = _parse_meta(str(p), dict(session.get_modelmeta().custom_metadata_map))
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT] or [o.name for o in outputs] != [OUTPUT]:
        raise ModelError(
            f"{p}: graph has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; "
            f"a prediction model has input {INPUT!r} and output {OUTPUT!r}: re-train it"
        )
    width = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
    if width != info.spec.n_features:
        raise ModelError(
            f"{p}: the graph takes {width} features but its metadata describes {info.spec.n_features}: "
            "the file is inconsistent; re-train it"
        )
    model = OnnxForecaster(session, info, data)
    # One tiny run now, so a graph that loads but cannot execute fails here, not in the control loop.
    try:
        probe = model.run(np.zeros((2, info.spec.n_features), dtype=np.float32))
    except Exception as e:
        raise ModelError(f"{p}: the model does not run: {e}. Re-train it") from None
    if probe.shape != (2, info.horizon, len(info.quantiles)):
        raise ModelError(
            f"{p}: the model returns shape {probe.shape[1:]}, its metadata says "
            f"({info.horizon}, {len(info.quantiles)}): re-train it"
        )
    if not np.isfinite(probe).all():
        raise ModelError(f"{p}: the model returns non-finite numbers: re-train it")
    log.info("loaded %s", info.describe())
    return model
