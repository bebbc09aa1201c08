"""The recommenders operators use today, as the backtest's yardsticks.

Each takes the whole trace but decides step t from `values[: t - lead + 1]` only, exactly like the project's
own policy in the backtest, and returns one allocation per step (0 where nothing is known yet).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.scaling import rule
from controller.scaling.rule import DEFAULT_RULE, RuleParams

F64 = npt.NDArray[np.float64]
DAY = 86400


def seed_rule(values: F64, lead: int = 1, params: RuleParams = DEFAULT_RULE) -> F64:
    """The controller's seed rule (`controller.scaling.rule.seed_rule`, with the controller's parameters)
    fed a last-value prediction (usage `lead` steps earlier). Like a freshly placed shadow in the controller,
    it starts with no limit, so its first step is the rule's first step; no floor or ceiling applies, since
    a trace's unit is not the controller's."""
    out = np.zeros(len(values))
    alloc = 0.0
    for t in range(lead, len(values)):
        alloc, _ = rule.seed_rule(float(values[t - lead]), alloc, params)
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


def hindsight_blocks(
    timestamps: npt.NDArray[np.int64],
    values: F64,
    scored: npt.NDArray[np.bool_],
    coverage: float,
    per_day: float = 7,
) -> F64:
    """Not a policy anyone can run: the limit an oracle that knows the whole trace would set with `per_day`
    changes a day, as a bound on what any forecaster could reach under that change budget. The scored steps
    are cut into equal blocks of 1/`per_day` day, each block's limit is one of its own values, and the misses
    the coverage allows go (greedily, each to where it saves the most slack) to the blocks' highest values.
    Equal blocks are a simplification: an oracle free to place its changes could do somewhat better."""
    step = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 1.0
    block = max(1, round(DAY / step / per_day))
    v = values[scored]
    budget = math.floor((1 - coverage) * len(v) + 1e-9)
    desc = [np.sort(v[i : i + block])[::-1] for i in range(0, len(v), block)]
    misses = [0] * len(desc)
    heap: list[tuple[float, int]] = []

    def offer(b: int) -> None:
        d, k = desc[b], misses[b]
        if k + 1 < len(d):  # lowering the block's limit to its next value saves this much slack
            heapq.heappush(heap, (-float(d[k] - d[k + 1]) * (len(d) - k - 1), b))

    for b in range(len(desc)):
        offer(b)
    while budget > 0 and heap:
        _, b = heapq.heappop(heap)
        misses[b] += 1
        budget -= 1
        offer(b)
    out = np.zeros(len(values))
    out[scored] = np.concatenate([np.full(len(d), d[misses[b]]) for b, d in enumerate(desc)]) if desc else []
    return out
