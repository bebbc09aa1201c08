"""The allocation derived from a quantile curve: priced tails, hysteresis, and calibration to target."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from controller.predict.allocation import (
    AllocationPolicy,
    AllocationState,
    Move,
    allocate,
    allocate_batch,
    observe,
    observe_batch,
)

Q = (0.1, 0.5, 0.9, 0.99, 0.999)
POLICY = AllocationPolicy()


def normal_curve(mu: float, sigma: float, horizon: int = 6) -> np.ndarray:
    row = [mu + sigma * NormalDist().inv_cdf(q) for q in Q]
    return np.tile(row, (horizon, 1))


def state(price: float, alloc: float | None = None, level: float | None = 100.0) -> AllocationState:
    return AllocationState(alloc, math.log(price), level)


def test_first_allocation_sits_in_the_upper_tail_and_says_so() -> None:
    a = allocate(normal_curve(100, 5), Q, state(1.0), POLICY)
    assert a.move is Move.FIRST and a.reason.startswith("first limit")
    assert 100 + 5 * 1.2 < a.allocation < 100 + 5 * 3.5
    assert 0 < a.miss_probability < 0.15
    assert a.state.allocation == a.allocation


def test_a_higher_miss_price_buys_a_higher_allocation() -> None:
    allocs = [allocate(normal_curve(100, 5), Q, state(p), POLICY).allocation for p in (0.01, 0.1, 1.0, 10.0)]
    assert allocs == sorted(allocs) and allocs[0] < allocs[-1]


def test_the_miss_budget_goes_where_covering_is_dearest() -> None:
    # Same price; one curve has a tight tail, one a long one (a spike may come). The long tail is covered
    # to a lower quantile: chasing it would cost more slack than the miss it avoids.
    tight = allocate(normal_curve(100, 2), Q, state(0.5), POLICY)
    spiky_row = [98.0, 100.0, 102.0, 300.0, 600.0]
    spiky = allocate(np.tile(spiky_row, (6, 1)), Q, state(0.5), POLICY)
    assert spiky.quantile < tight.quantile


def test_hysteresis_keeps_small_changes_and_makes_big_ones() -> None:
    first = allocate(normal_curve(100, 5), Q, state(1.0), POLICY)
    s = first.state
    same = allocate(normal_curve(100.5, 5), Q, s, POLICY)
    assert same.move is Move.KEPT and same.allocation == first.allocation and "kept" in same.reason
    up = allocate(normal_curve(150, 5), Q, s, POLICY)
    assert up.move is Move.RAISED and up.allocation > 150 and "raised" in up.reason
    down = allocate(normal_curve(50, 5), Q, s, POLICY)
    assert down.move is Move.LOWERED and down.allocation < first.allocation
    no_hysteresis = AllocationPolicy(change_cost=0.0)
    assert allocate(normal_curve(100.5, 5), Q, s, no_hysteresis).move is Move.RAISED


def test_the_limit_serves_the_worst_of_the_span() -> None:
    curve = normal_curve(100, 5)
    curve[2] += 50  # demand arrives in three steps
    one = allocate(curve, Q, state(1.0), AllocationPolicy(span=1))
    three = allocate(curve, Q, state(1.0), AllocationPolicy(span=3))
    assert one.allocation < 120 < 150 < three.allocation


def test_first_step_reads_the_curve_at_the_lead() -> None:
    curve = normal_curve(100, 5)
    curve[3:] += 100
    assert allocate(curve, Q, state(1.0), AllocationPolicy(span=1), first_step=3).allocation > 200
    with pytest.raises(ValueError, match="outside the forecast horizon"):
        allocate(curve, Q, state(1.0), POLICY, first_step=6)


def test_observe_moves_the_price_by_the_tracking_rule() -> None:
    s = state(1.0, alloc=100.0)
    alpha = 1 - POLICY.target_coverage
    missed = observe(s, 101.0, POLICY)
    covered = observe(s, 99.0, POLICY)
    assert missed.log_price == pytest.approx(POLICY.gain * (1 - alpha))
    assert covered.log_price == pytest.approx(-POLICY.gain * alpha)
    # judged against the limit that was in force then, when decisions run ahead of observations
    assert observe(s, 101.0, POLICY, allocation=105.0).log_price == covered.log_price
    assert observe(AllocationState(), 1e9, POLICY) == AllocationState(), "no limit yet: nothing to learn"


def test_batch_functions_agree_with_the_single_ones() -> None:
    curves = np.stack([normal_curve(100, 5), normal_curve(10, 4), normal_curve(1e6, 1e4)])
    cur = np.array([np.nan, 12.0, 1.02e6])
    lp = np.log([1.0, 0.2, 3.0])
    lvl = np.array([np.nan, 10.0, 1e6])
    b = allocate_batch(curves, Q, cur, lp, lvl, POLICY)
    for i in range(3):
        s = AllocationState(
            None if np.isnan(cur[i]) else float(cur[i]),
            float(lp[i]),
            None if np.isnan(lvl[i]) else float(lvl[i]),
        )
        one = allocate(curves[i], Q, s, POLICY)
        assert one.allocation == pytest.approx(b.allocation[i])
        assert int(one.move) == int(b.move[i])
    usage = np.array([90.0, 20.0, 1e6])
    new_lp, new_lvl = observe_batch(b.allocation, lp, lvl, usage, POLICY)
    for i in range(3):
        s = AllocationState(float(b.allocation[i]), float(lp[i]), None if np.isnan(lvl[i]) else float(lvl[i]))
        o = observe(s, float(usage[i]), POLICY)
        assert o.log_price == pytest.approx(new_lp[i]) and o.level == pytest.approx(new_lvl[i])


@pytest.mark.parametrize("width", [0.3, 1.0, 3.0])
def test_coverage_converges_to_target_whatever_the_forecasts_calibration(width: float) -> None:
    # Usage is N(100, 10) but the forecaster believes sigma = 10 * width: too narrow, right, too wide.
    rng = np.random.default_rng(7)
    policy = AllocationPolicy(target_coverage=0.99, span=1, change_cost=0.0)
    s = AllocationState.initial(policy)
    curve = normal_curve(100, 10 * width)
    covered = []
    for _ in range(6000):
        a = allocate(curve, Q, s, policy)
        u = float(rng.normal(100, 10))
        covered.append(u <= a.allocation)
        s = observe(a.state, u, policy)
    assert np.mean(covered[1000:]) == pytest.approx(0.99, abs=0.004)
