"""Writing a trained network as an ONNX file with its metadata. Needs `onnx` (the `train` extra); serving
reads the file with onnxruntime alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from controller.predict.model import FORMAT_VERSION, INPUT, OUTPUT
from training.net import NetParams

OPSET = 17


def metadata_strings(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata values are strings: scalars as text, anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}


def to_onnx_bytes(p: NetParams, horizon: int, n_q: int, meta: dict[str, Any]) -> bytes:
    """The network as an ONNX model: features (N, F) float32 -> quantiles (N, horizon, n_q) float32, in the
    model's normalised units, monotone in the last axis (cumulative softplus, as in `net.forward`)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "writing a model needs the `onnx` package: pip install 'shadowplane[train]'"
        ) from e

    n_in = p.w1.shape[0]

    def init(name: str, a: np.ndarray[Any, Any]) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(a), name)

    inits = [
        init("w1", p.w1.astype(np.float32)),
        init("b1", p.b1.astype(np.float32)),
        init("w2", p.w2.astype(np.float32)),
        init("b2", p.b2.astype(np.float32)),
        init("ws", p.ws.astype(np.float32)),
        init("shape", np.array([-1, horizon, n_q], dtype=np.int64)),
        init("zero", np.array([0], dtype=np.int64)),
        init("one", np.array([1], dtype=np.int64)),
        init("end", np.array([n_q], dtype=np.int64)),
        init("axis", np.array([2], dtype=np.int64)),
        init("axis_scalar", np.array(2, dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("MatMul", [INPUT, "w1"], ["h_pre0"]),
        helper.make_node("Add", ["h_pre0", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["r_hidden"]),
        helper.make_node("MatMul", [INPUT, "ws"], ["r_skip"]),
        helper.make_node("Add", ["r_hidden", "r_skip"], ["r_sum"]),
        helper.make_node("Add", ["r_sum", "b2"], ["raw_flat"]),
        helper.make_node("Reshape", ["raw_flat", "shape"], ["raw"]),
        helper.make_node("Slice", ["raw", "zero", "one", "axis"], ["base"]),
        helper.make_node("Slice", ["raw", "one", "end", "axis"], ["inc_raw"]),
        helper.make_node("Softplus", ["inc_raw"], ["inc"]),
        helper.make_node("CumSum", ["inc", "axis_scalar"], ["inc_cum"]),
        helper.make_node("Add", ["base", "inc_cum"], ["upper"]),
        helper.make_node("Concat", ["base", "upper"], [OUTPUT], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "shadowplane_quantile_forecaster",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["rows", n_in])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["rows", horizon, n_q])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shadowplane-train"
    )
    # The IR version onnxruntime releases of the last two years all read.
    model.ir_version = 8
    model.doc_string = "Shadowplane quantile forecaster: see docs/prediction.md"
    helper.set_model_props(model, metadata_strings({"format_version": FORMAT_VERSION, **meta}))
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_model(path: str | Path, p: NetParams, horizon: int, n_q: int, meta: dict[str, Any]) -> None:
    """Write atomically: a controller watching the path never reads half a file."""
    path = Path(path)
    data = to_onnx_bytes(p, horizon, n_q, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
