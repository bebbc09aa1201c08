"""The Resource Pool Manager's placement on a synthetic fleet built from real traces, beside what an
operator would do without it.

    .venv/bin/python bench/pool_placement.py [--services 300] [--large-services 1000] [--seed 1]

The fleet: services spread over 3 zones, one primary host each, 1 in 4 of them large (64 cores, 256 GiB,
2.90/h), the rest small (16 cores, 64 GiB, 0.80/h), and a shadow pool of 20 hosts (half large) per
zone (per 300 services). Each service's demand is one of the NAB traces in ../shared/traces/nab/ (a random
day of it; CPU scaled to 30-60 % of its host, memory 15-40 %), its forecast what production computes: the
shipped ONNX model through `PredictionEngine.forecast` on a day of 5-minute history, the q0.95 curve's
peak over the model's horizon. Shadows are placed by `controller.pool.placement.plan` with the shipped
`PlanOptions`, and every plan is judged by `controller.pool.coverage.check` (an independent count of every
single-host and single-zone failure):

- dedicated 1:1 (a twin of each primary in another zone), naive N+1 per zone, the pool on every host's
  headroom, and the pool on the shadow hosts alone: reserved cores, price per hour, scenarios covered by the
  forecast demand and by the demand that then came (the traces' next horizon), solve time;
- a re-plan 30 minutes later (new forecasts), unbounded and with at most 5 % of services moving;
- the solve time for --large-services services, with the shipped time limit and with 30 s.
Prices are relative (any currency per hour); the figures that compare are ratios against dedicated 1:1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.pool.alternatives import Alternative, dedicated_twins, n_plus_one  # noqa: E402
from controller.pool.coverage import check  # noqa: E402
from controller.pool.model import Plan, PoolHost, PoolService  # noqa: E402
from controller.pool.placement import PlanOptions, plan  # noqa: E402
from controller.predict.engine import PredictionEngine  # noqa: E402
from controller.predict.series import SeriesBatch  # noqa: E402
from training.traces import Trace, load_trace  # noqa: E402

GIB = 2**30
TRACES = ROOT.parent / "shared" / "traces" / "nab"
SMALL = (16.0, 64 * GIB, 0.80)
LARGE = (64.0, 256 * GIB, 2.90)
QUANTILE = 0.95
HISTORY = 290  # the shipped model's history (steps of 5 minutes)
LONG_LIMIT_SECONDS = 30.0


@dataclass(frozen=True)
class Fleet:
    hosts: tuple[PoolHost, ...]
    services: tuple[PoolService, ...]
    actual: tuple[PoolService, ...]  # the same services with the demand that came over the horizon


def traces() -> list[Trace]:
    return [load_trace(p) for p in sorted(TRACES.glob("*.csv"))]


class Demand:
    """Each service's utilisation day, from a trace, and its forecast at an origin."""

    def __init__(self, n: int, seed: int, engine: PredictionEngine) -> None:
        rng = np.random.default_rng(seed)
        self.engine = engine
        self.all = traces()
        self.trace = [self.all[i % len(self.all)] for i in range(n)]
        self.large = rng.random(n) < 0.25
        self.cpu_share = rng.uniform(0.3, 0.6, n)
        self.mem_share = rng.uniform(0.15, 0.4, n)
        span = HISTORY + 24
        self.start = np.array([rng.integers(0, len(t) - span - 12) for t in self.trace])

    def util(self, i: int, begin: int, end: int) -> np.ndarray:
        t = self.trace[i]
        scale = float(np.percentile(t.values, 99.5)) or 1.0
        return np.clip(t.values[begin:end] / scale, 0.0, 1.2)

    def at(self, shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(forecast cores, forecast bytes, actual peak cores, actual peak bytes) with history ending
        `shift` steps after each service's start."""
        n = len(self.trace)
        horizon = self.engine.forecaster.horizon
        values = np.zeros((n, 3, HISTORY))
        peak_u = np.zeros(n)
        for i in range(n):
            s = int(self.start[i]) + shift
            u = self.util(i, s, s + HISTORY)
            cores, mem = (LARGE if self.large[i] else SMALL)[:2]
            values[i, 0] = u * self.cpu_share[i] * cores
            values[i, 1] = (0.7 + 0.3 * u) * self.mem_share[i] * mem
            values[i, 2] = u * 20e6
            peak_u[i] = float(self.util(i, s + HISTORY, s + HISTORY + horizon).max())
        origin = np.array([float(self.trace[i].timestamps[int(self.start[i]) + shift + HISTORY - 1])
                           for i in range(n)])  # fmt: skip
        batch = SeriesBatch(
            keys=tuple(f"p{i}/svc" for i in range(n)), origin_ts=origin, step_seconds=300, values=values
        )
        fc = self.engine.forecast(batch).at_quantile(QUANTILE)  # (n, resources, horizon)
        cpu = np.maximum(fc[:, 0, :].max(axis=1), 0.0)
        mem = np.maximum(fc[:, 1, :].max(axis=1), 0.0)
        cores = np.where(self.large, LARGE[0], SMALL[0])
        mem_size = np.where(self.large, LARGE[1], SMALL[1])
        return (
            np.minimum(cpu, cores),
            np.minimum(mem, mem_size),
            peak_u * self.cpu_share * cores,
            (0.7 + 0.3 * peak_u) * self.mem_share * mem_size,
        )


def fleet(d: Demand, shift: int, pool_per_zone: int, headroom: bool = True) -> Fleet:
    cpu, mem, real_cpu, real_mem = d.at(shift)
    hosts, services, actual = [], [], []
    for i in range(len(d.trace)):
        cores, size, price = LARGE if d.large[i] else SMALL
        zone = "abc"[i % 3]
        used_c, used_m = (float(cpu[i]), int(mem[i])) if headroom else (cores, size)
        hosts.append(PoolHost(f"p{i}", zone, cores, size, price, used_cores=used_c, used_memory_bytes=used_m))
        services.append(PoolService(f"s{i}", f"p{i}", float(cpu[i]), int(mem[i])))
        actual.append(PoolService(f"s{i}", f"p{i}", float(real_cpu[i]), int(real_mem[i])))
    for z in "abc":
        for j in range(pool_per_zone):
            cores, size, price = LARGE if j % 2 == 0 else SMALL
            hosts.append(PoolHost(f"shadow-{z}{j}", z, cores, size, price))
    return Fleet(tuple(hosts), tuple(services), tuple(actual))


def row(name: str, price: float, cores: float, host: tuple[int, int], zone: tuple[int, int],
        real: str, secs: str, base: float) -> str:  # fmt: skip
    return (
        f"| {name} | {cores:,.0f} | {price:,.2f} | {price / base:.3f} | {host[0]}/{host[1]} "
        f"| {zone[0]}/{zone[1]} "
        f"| {real} | {secs} |"
    )


def covered_by_what_came(f: Fleet, p: Plan) -> str:
    """The plan's shadows counted again with the demand that then came (the traces' next horizon)."""
    came = check(f.hosts, f.actual, p.as_dict())
    return f"{came.host_covered}/{came.host_scenarios} host, {came.zone_covered}/{came.zone_scenarios} zone"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=300)
    ap.add_argument("--large-services", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    opts = PlanOptions()
    engine = PredictionEngine()
    print(
        f"# bench/pool_placement.py, {dt.date.today()}, {platform.node()}, python {platform.python_version()}"
    )
    print(f"production defaults: {opts}; demand q{QUANTILE:g} over the model's horizon "
          f"({engine.forecaster.horizon} steps of {engine.step_seconds} s), "
          f"model {engine.model_version}")  # fmt: skip
    pool_hosts = 20 * a.services // 300
    d = Demand(a.services, a.seed, engine)
    f = fleet(d, 0, pool_hosts)
    print(f"fleet: {a.services} services in 3 zones, {sum(d.large)} large and {a.services - sum(d.large)} "
          f"small primaries, {3 * pool_hosts} shadow-pool hosts; forecast demand "
          f"{sum(s.cpu_cores for s in f.services):,.0f} "
          f"cores, {sum(s.memory_bytes for s in f.services) / GIB:,.0f} GiB")  # fmt: skip
    twins = dedicated_twins(f.hosts, f.services)
    naive = n_plus_one(f.hosts, f.services)
    print()
    print("| placement | reserved cores | price / h | vs 1:1 | host failures covered | zone failures covered "
          "| covered by the demand that came | solve s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = twins.price_per_hour

    def alt(x: Alternative) -> str:
        return row(x.name, x.price_per_hour, x.reserved_cores, (x.host_covered, x.host_scenarios),
                   (x.zone_covered, x.zone_scenarios), "(same as forecast)", "-", base)  # fmt: skip

    print(alt(twins))
    print(alt(naive))
    results = {}
    for label, fl in (
        ("pool (every host's headroom)", f),
        ("pool (shadow hosts only)", fleet(d, 0, pool_hosts, False)),
    ):
        t = time.monotonic()
        p = plan(fl.hosts, fl.services, options=opts)
        secs = time.monotonic() - t
        cov = p.coverage
        came = covered_by_what_came(fl, p)
        reserved = sum(r.cores for r in cov.reserves)
        print(row(label, cov.price_per_hour, reserved, (cov.host_covered, cov.host_scenarios),
                  (cov.zone_covered, cov.zone_scenarios), came, f"{secs:.2f} ({p.solver})",
                  base))  # fmt: skip
        results[label] = (p, fl)
    first, _ = results["pool (every host's headroom)"]
    print()
    print("re-plan 30 minutes later (6 steps on; new forecasts, the first plan as the previous placement):")
    later = fleet(d, 6, pool_hosts)
    for bound in (None, max(1, a.services // 20)):
        t = time.monotonic()
        p = plan(later.hosts, later.services, first.as_dict(), replace(opts, max_moves=bound))
        secs = time.monotonic() - t
        cov = p.coverage
        forced = sum(1 for m in p.moves if m.reason != "a cheaper placement")
        print(f"- max_moves {bound}: {len(p.moves)} moves ({forced} because the old placement had no room), "
              f"price {cov.price_per_hour:,.2f}/h ({cov.price_per_hour / base:.3f} of 1:1), every scenario "
              f"covered: {cov.all_covered}, {secs:.2f} s ({p.solver})")  # fmt: skip
    print()
    n = a.large_services
    big = fleet(Demand(n, a.seed + 1, engine), 0, 20 * n // 300)
    bt = dedicated_twins(big.hosts, big.services)
    # the shipped time limit, then a longer one: what HiGHS proves of the plan when its root relaxation
    # has time to finish (at 1,000 services it may not within 5 s on a slow machine)
    for limit in (opts.time_limit_seconds, LONG_LIMIT_SECONDS):
        t = time.monotonic()
        p = plan(big.hosts, big.services, options=replace(opts, time_limit_seconds=limit))
        secs = time.monotonic() - t
        cov = p.coverage
        print(f"{n} services ({len(big.hosts)} hosts, {p.candidates:,} candidate pairs), time limit "
              f"{limit:g} s: solved in {secs:.2f} s ({p.solver}), price "
              f"{cov.price_per_hour / bt.price_per_hour:.3f} of 1:1, "
              f"host failures covered {cov.host_covered}/{cov.host_scenarios}, zone failures "
              f"{cov.zone_covered}/{cov.zone_scenarios}")  # fmt: skip


if __name__ == "__main__":
    main()
