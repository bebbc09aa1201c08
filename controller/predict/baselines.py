"""The recommenders operators use today, as the backtest's yardsticks.

Each takes the whole trace but decides step t from `values[: t - lead + 1]` only, exactly like the project's
own policy in the backtest, and returns one allocation per step (0 where nothing is known yet).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
DAY = 86400


@dataclass(frozen=True)
class SeedRule:
    """The seed's scaling rule: predicted > alloc*1.2 -> add (pred-alloc)*1.5; predicted < alloc*0.8 ->
    remove (alloc-pred)*0.5."""

    up_ratio: float = 1.2
    up_gain: float = 1.5
    down_ratio: float = 0.8
    down_gain: float = 0.5


def seed_rule_step(alloc: float, predicted: float, rule: SeedRule = SeedRule()) -> float:
    """One application of the seed rule: the new allocation."""
    if predicted > alloc * rule.up_ratio:
        return alloc + (predicted - alloc) * rule.up_gain
    if predicted < alloc * rule.down_ratio:
        return alloc - (alloc - predicted) * rule.down_gain
    return alloc


def seed_rule(values: F64, lead: int = 1, rule: SeedRule = SeedRule()) -> F64:
    """The seed rule fed a last-value prediction (usage `lead` steps earlier); it starts from the first
    prediction, as a freshly placed shadow would."""
    out = np.zeros(len(values))
    alloc: float | None = None
    for t in range(lead, len(values)):
        pred = float(values[t - lead])
        alloc = pred if alloc is None else seed_rule_step(alloc, pred, rule)
        out[t] = alloc
    return out


@dataclass(frozen=True)
class VpaOptions:
    """Kubernetes VPA's recommender: a histogram with exponentially growing buckets (5 % apart) whose
    samples' weights decay with a 24 h half-life; the target is its P90 plus a 15 % safety margin.

    VPA's first bucket is 0.01 cores wide, which in other units would be arbitrary; here buckets are 5 %
    apart from `min_value` up, which is at least as fine as VPA's and so never hurts the baseline."""

    percentile: float = 0.9
    half_life_seconds: float = DAY
    safety_margin: float = 0.15
    bucket_growth: float = 0.05
    min_value: float = 1e-6
    max_value: float = 1e12


def _bucket_edges(opts: VpaOptions) -> F64:
    n = math.ceil(math.log(opts.max_value / opts.min_value) / math.log1p(opts.bucket_growth)) + 1
    return np.concatenate([[0.0], opts.min_value * (1 + opts.bucket_growth) ** np.arange(n)])


def vpa_recommender(
    timestamps: npt.NDArray[np.int64], values: F64, lead: int = 1, opts: VpaOptions = VpaOptions()
) -> F64:
    edges = _bucket_edges(opts)
    nb = len(edges)  # the last bucket is open-ended: values past max_value land there
    weights = np.zeros(nb)
    total = 0.0
    ref = float(timestamps[0])
    out = np.zeros(len(values))
    buckets = np.clip(np.searchsorted(edges, np.maximum(values, 0.0), side="right") - 1, 0, nb - 1)
    for t in range(lead, len(values)):
        i = t - lead
        # Weight grows with time instead of old weights shrinking (VPA does the same); rebase before the
        # exponent can overflow.
        exponent = (float(timestamps[i]) - ref) / opts.half_life_seconds
        if exponent > 60:
            shift = 2.0**-exponent
            weights *= shift
            total *= shift
            ref = float(timestamps[i])
            exponent = 0.0
        w = 2.0**exponent
        weights[buckets[i]] += w
        total += w
        b = int(np.searchsorted(np.cumsum(weights), opts.percentile * total, side="left"))
        b = min(b, nb - 1)
        # VPA reports the end of the bucket the percentile falls in (the start of the last, open one).
        p = edges[b + 1] if b + 1 < nb else edges[b]
        out[t] = p * (1 + opts.safety_margin)
    return out


def autopilot_max(
    timestamps: npt.NDArray[np.int64], values: F64, lead: int = 1, window_seconds: float = DAY
) -> F64:
    """Autopilot's moving-window peak recommender: the largest usage seen in the last 24 h."""
    out = np.zeros(len(values))
    window: deque[int] = deque()  # indices with decreasing values: the front is the window's max
    for t in range(lead, len(values)):
        i = t - lead
        while window and values[window[-1]] <= values[i]:
            window.pop()
        window.append(i)
        while timestamps[window[0]] <= timestamps[i] - window_seconds:
            window.popleft()
        out[t] = values[window[0]]
    return out
