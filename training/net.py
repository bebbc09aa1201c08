"""The quantile network, in numpy: forward pass, gradients, and the Adam loop that trains it.

    hidden = relu(x @ w1 + b1)
    raw    = hidden @ w2 + b2 + x @ ws                   (rows, horizon * quantiles)
    y[.., 0] = raw[.., 0];  y[.., k] = y[.., k-1] + softplus(raw[.., k])

The cumulative softplus makes every forecast's quantiles increase with q by construction (no crossing,
no sorting needed at serving time); the linear skip `x @ ws` lets the network start from a linear
autoregression and spend its hidden units on what a linear model cannot do. The same arithmetic is
written as an ONNX graph by `onnx_export.py`, and a test checks the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


@dataclass
class NetParams:
    w1: F64
    b1: F64
    w2: F64
    b2: F64
    ws: F64

    def arrays(self) -> dict[str, F64]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, "ws": self.ws}


@dataclass(frozen=True)
class TrainSettings:
    hidden: int = 64
    epochs: int = 20
    batch: int = 1024
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0


def init_params(n_in: int, hidden: int, horizon: int, n_q: int, rng: np.random.Generator) -> NetParams:
    n_out = horizon * n_q
    b2 = np.zeros((horizon, n_q))
    # Start with quantiles one unit apart: softplus(0.5413) = 1.
    b2[:, 1:] = math.log(math.e - 1)
    return NetParams(
        w1=rng.normal(0, math.sqrt(2 / n_in), (n_in, hidden)),
        b1=np.zeros(hidden),
        w2=rng.normal(0, 0.1 / math.sqrt(hidden), (hidden, n_out)),
        b2=b2.reshape(-1),
        ws=np.zeros((n_in, n_out)),
    )


def _softplus(z: F64) -> F64:
    return np.asarray(np.logaddexp(0.0, z))


def _sigmoid(z: F64) -> F64:
    return np.asarray(0.5 * (1 + np.tanh(0.5 * z)))


def forward(p: NetParams, x: npt.NDArray[np.floating], horizon: int, n_q: int) -> F64:
    """(rows, horizon, quantiles) in normalised units."""
    x64 = np.asarray(x, dtype=np.float64)
    hidden = np.maximum(x64 @ p.w1 + p.b1, 0.0)
    raw = (hidden @ p.w2 + p.b2 + x64 @ p.ws).reshape(-1, horizon, n_q)
    return _quantiles(raw)


def _quantiles(raw: F64) -> F64:
    inc = _softplus(raw[..., 1:])
    return np.concatenate([raw[..., :1], raw[..., :1] + np.cumsum(inc, axis=-1)], axis=-1)


def pinball(y: F64, target: F64, quantiles: F64, weights: F64 | None = None) -> float:
    """Mean pinball loss of (rows, horizon, Q) forecasts against (rows, horizon) targets, row-weighted."""
    d = target[..., None] - y
    loss = np.maximum(quantiles * d, (quantiles - 1) * d).mean(axis=(1, 2))
    if weights is None:
        return float(loss.mean())
    return float((loss * weights).sum() / weights.sum())


def _grads(
    p: NetParams, x: F64, target: F64, w: F64, quantiles: F64, horizon: int
) -> tuple[float, dict[str, F64]]:
    n_q = len(quantiles)
    pre = x @ p.w1 + p.b1
    hidden = np.maximum(pre, 0.0)
    raw = (hidden @ p.w2 + p.b2 + x @ p.ws).reshape(-1, horizon, n_q)
    y = _quantiles(raw)
    d = target[..., None] - y
    norm = w.sum() * horizon * n_q
    loss = float((np.maximum(quantiles * d, (quantiles - 1) * d).sum(axis=(1, 2)) * w).sum() / norm)
    # d pinball / d y = 1[target <= y] - q
    g = ((d <= 0).astype(np.float64) - quantiles) * (w[:, None, None] / norm)
    graw = np.empty_like(raw)
    graw[..., 0] = g.sum(axis=-1)
    # y_k depends on every increment j <= k: reverse cumulative sum
    tail = np.cumsum(g[..., :0:-1], axis=-1)[..., ::-1]
    graw[..., 1:] = tail * _sigmoid(raw[..., 1:])
    graw2 = graw.reshape(len(x), -1)
    gh = graw2 @ p.w2.T
    gh[pre <= 0] = 0.0
    return loss, {
        "w1": x.T @ gh,
        "b1": gh.sum(axis=0),
        "w2": hidden.T @ graw2,
        "b2": graw2.sum(axis=0),
        "ws": x.T @ graw2,
    }


def train(
    x: F32,
    target: F64,
    quantiles: tuple[float, ...],
    weights: F64 | None = None,
    settings: TrainSettings = TrainSettings(),
    progress: Callable[[int, float], None] | None = None,
) -> NetParams:
    """Minimise the weighted pinball loss with Adam; deterministic for a given seed."""
    rng = np.random.default_rng(settings.seed)
    n, n_in = x.shape
    horizon = target.shape[1]
    q = np.asarray(quantiles, dtype=np.float64)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w * (n / w.sum())
    p = init_params(n_in, settings.hidden, horizon, len(q), rng)
    m = {k: np.zeros_like(v) for k, v in p.arrays().items()}
    v2 = {k: np.zeros_like(v) for k, v in p.arrays().items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    x64 = np.asarray(x, dtype=np.float64)
    for epoch in range(settings.epochs):
        order = rng.permutation(n)
        # cosine decay: big steps first, fine ones at the end
        lr = settings.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
        total = 0.0
        for start in range(0, n, settings.batch):
            idx = order[start : start + settings.batch]
            loss, grads = _grads(p, x64[idx], target[idx], w[idx], q, horizon)
            total += loss * len(idx)
            step += 1
            for k, g in grads.items():
                if k in ("w1", "w2", "ws"):
                    g = g + settings.weight_decay * getattr(p, k)
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                mh = m[k] / (1 - b1**step)
                vh = v2[k] / (1 - b2**step)
                setattr(p, k, getattr(p, k) - lr * mh / (np.sqrt(vh) + eps))
        if progress is not None:
            progress(epoch, total / n)
    return p
