"""Placement: each service's shadow host, at the lowest price of reserved capacity such that every single
zone failure (and so every single host failure in it) finds room on the surviving shadows for the forecast
demand of every service it fails, never in a primary's zone, and within a bound on moves.

A mixed-integer program solved by HiGHS (highspy). Why HiGHS and not CP-SAT: the model is a covering
problem with continuous reserves (cores, GiB) whose LP relaxation bounds the price from below, which
simplex-based branch and bound turns into a proven gap, while CP-SAT would need every demand scaled to
integers; highspy is a
3 MB MIT-licensed wheel needing only numpy, where OR-Tools is 30 MB and pins its own protobuf range, which
would bind the gRPC stack's.

    x[s,h] in {0,1}   s's shadow is h                 sum_h x[s,h] + unplaced[s] = 1
    r[h] >= 0         cores reserved on h             sum_{s failing with domain F} cpu[s] x[s,h] <= r[h]
                                                      for every failure domain F and every host h outside it
    u[h] in [0,1]     the share of h reserved         r[h] / cores[h] <= u[h] (and the same for memory)
    minimise  sum_h price[h] u[h]  +  a small price per move  +  a large price per unplaced service

A zone's failure fails every host in it, so its row bounds each single-host failure inside it too: with zone
coverage on, host rows are implied and not written. A dedicated service takes a host that runs no primary,
whole (u = 1), and nothing else lands there.

Each service chooses among a shortlist per other zone (`candidates_per_zone`: half the cheapest hosts per
core, half a spread by a hash of the pair, so that services do not all crowd the same few), plus where it is
now and where the greedy start put it. The greedy start (over every eligible host) is the solver's first
incumbent: a time limit still returns a plan at least that good.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highspy
import numpy as np

from controller.pool.coverage import check, eligible
from controller.pool.model import Move, Plan, PoolHost, PoolService

GIB = 2**30
_banner_shown = False


def _highs() -> highspy.Highs:
    """A quiet solver. HiGHS prints a banner to file descriptor 1 when the first one of a process is made,
    before any option can be set; `shadowctl pool plan --json` and the benchmark print on that descriptor."""
    global _banner_shown
    if _banner_shown:
        h = highspy.Highs()  # type: ignore[no-untyped-call]
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
                h = highspy.Highs()  # type: ignore[no-untyped-call]
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _banner_shown = True
    h.setOptionValue("output_flag", False)
    return h


@dataclass(frozen=True)
class PlanOptions:
    cover_zones: bool = True  # False: single-host failures only
    max_moves: int | None = None  # moves of already placed services per re-plan (None: no bound)
    candidates_per_zone: int = 8  # 0: every eligible host
    time_limit_seconds: float = 5.0  # the best plan found by then, with its distance from the optimum
    mip_gap: float = 0.01  # stop within 1 % of the best possible price
    # A move costs a warm-up: a re-plan moves a shadow only to save at least this much per hour (in the
    # hosts' price unit; about 2-5 % of a host at cloud-like prices).
    move_price: float = 0.05


class PlacementError(ValueError):
    pass


def _rank(service: str, host: PoolHost) -> tuple[float, bytes]:
    per_core = host.price_per_hour / host.cores if host.cores else float("inf")
    return round(per_core, 6), hashlib.blake2b(f"{service}\0{host.name}".encode(), digest_size=8).digest()


def candidates(
    services: Sequence[PoolService], hosts: Sequence[PoolHost]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every host each service's shadow may go to, and why a service has none."""
    by_name = {h.name: h for h in hosts}
    primaries = {s.primary for s in services}
    out: dict[str, list[str]] = {}
    none: dict[str, str] = {}
    for s in services:
        primary = by_name.get(s.primary)
        if primary is None:
            none[s.name] = f"its primary {s.primary} is not in the pool's hosts"
            continue
        if s.pinned:
            if s.pinned in by_name:
                out[s.name] = [s.pinned]
            else:
                none[s.name] = f"its shadow {s.pinned} is not in the pool's hosts"
            continue
        fits = [
            h.name
            for h in hosts
            if eligible(s, h, primary) is None
            and s.cpu_cores <= h.free_cores
            and s.memory_bytes <= h.free_memory_bytes
            and not (s.tier == "dedicated" and (h.name in primaries or h.used_cores > 0))
        ]
        if fits:
            out[s.name] = fits
        else:
            none[s.name] = (
                f"no host outside zone {primary.zone or primary.name} has {s.cpu_cores:.2f} cores and "
                f"{s.memory_bytes / GIB:.1f} GiB free"
                + (" and runs no primary (dedicated)" if s.tier == "dedicated" else "")
                + (f" with perf_class {s.shadow_class}" if s.shadow_class else "")
            )
    return out, none


def shortlist(service: str, fits: Sequence[PoolHost], per_zone: int, keep: set[str]) -> list[str]:
    """What the solver chooses among for one service: per other zone, half the cheapest hosts per core and
    half a spread by a hash of the pair (with only the cheapest, every service would shortlist the same few
    hosts), and `keep` (where it is now, and the greedy start's choice)."""
    if per_zone <= 0:
        return [h.name for h in fits]
    by_zone: dict[str, list[PoolHost]] = defaultdict(list)
    for h in fits:
        by_zone[h.failure_domain].append(h)
    chosen = {h.name for h in fits if h.name in keep}
    for zone in by_zone.values():
        cheapest = sorted(zone, key=lambda h: _rank(service, h))
        chosen |= {h.name for h in cheapest[: (per_zone + 1) // 2]}
        spread = sorted(cheapest[(per_zone + 1) // 2 :], key=lambda h: _rank(service, h)[1])
        chosen |= {h.name for h in spread[: per_zone // 2]}
    return [h.name for h in fits if h.name in chosen]


def plan(
    hosts: Sequence[PoolHost],
    services: Sequence[PoolService],
    previous: Mapping[str, str] | None = None,
    options: PlanOptions = PlanOptions(),
) -> Plan:
    """The cheapest placement under `options`, starting from `previous` (service -> shadow host)."""
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise PlacementError("hosts: a host name appears twice")
    if len({s.name for s in services}) != len(services):
        raise PlacementError("services: a service name appears twice")
    previous = dict(previous or {})
    started = time.monotonic()
    by_name = {h.name: h for h in hosts}
    full, none = candidates(services, hosts)
    domain_of = {s.name: _domain(s, by_name, options.cover_zones) for s in services if s.name in full}
    start = _greedy(full, [s for s in services if s.name in full], by_name, domain_of, previous)
    cand = {
        name: shortlist(name, [by_name[h] for h in fits], options.candidates_per_zone,
                        {x for x in (previous.get(name), start.get(name)) if x})
        for name, fits in full.items()
    }  # fmt: skip
    left = max(1.0, options.time_limit_seconds - (time.monotonic() - started))
    shadows, unplaced, solver, n = _solve(hosts, services, cand, previous, options, left, start, domain_of)
    for name, why in none.items():
        unplaced[name] = why
    moves = _moves(services, hosts, previous, shadows, unplaced, options.cover_zones)
    return Plan(
        shadows=tuple(sorted(shadows.items())),
        coverage=check(hosts, services, shadows, options.cover_zones),
        moves=moves,
        unplaced=tuple(sorted(unplaced.items())),
        solver=solver,
        solve_seconds=time.monotonic() - started,
        candidates=n,
    )


def _moves(
    services: Sequence[PoolService],
    hosts: Sequence[PoolHost],
    previous: Mapping[str, str],
    shadows: Mapping[str, str],
    unplaced: Mapping[str, str],
    cover_zones: bool,
) -> tuple[Move, ...]:
    by_name = {h.name: h for h in hosts}
    # where the previous placement itself falls short now (forecasts grew, a host filled): those services
    # had to move, whatever the price
    short: dict[str, str] = {}
    for f in check(hosts, services, {k: v for k, v in previous.items() if v}, cover_zones).shortfalls:
        for name in f.service.split(","):
            short.setdefault(name, f"{f.scenario}: {f.why}")
    out = []
    for s in services:
        before, after = previous.get(s.name, ""), shadows.get(s.name, "")
        if before == after:
            continue
        if not after:
            why = f"not placed: {unplaced.get(s.name, 'no room in some failure scenario')}"
        elif not before:
            why = "first placement"
        else:
            old, primary = by_name.get(before), by_name.get(s.primary)
            problem = (
                "no longer in the pool"
                if old is None or primary is None
                else eligible(s, old, primary)
                or (
                    "no longer has room for its forecast demand"
                    if s.cpu_cores > old.free_cores or s.memory_bytes > old.free_memory_bytes
                    else None
                )
            )
            if problem:
                why = f"{before} {problem}"
            elif s.name in short:
                why = f"no room where it was in {short[s.name]}"
            else:
                why = "a cheaper placement"
        out.append(Move(s.name, before, after, why))
    return tuple(out)


def _solve(
    hosts: Sequence[PoolHost],
    services: Sequence[PoolService],
    cand: Mapping[str, list[str]],
    previous: Mapping[str, str],
    options: PlanOptions,
    time_limit: float,
    start: Mapping[str, str],
    domain_of: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str], str, int]:
    by_name = {h.name: h for h in hosts}
    placeable = [s for s in services if cand.get(s.name)]
    if not placeable:
        return {}, {}, "nothing to place", 0
    # columns: x[s,h] ..., unplaced[s] ..., then per host used: r_cpu, r_mem, u, (ded)
    pairs = [(s, h) for s in placeable for h in cand[s.name]]
    used_hosts = sorted({h for _, h in pairs})
    hidx = {h: i for i, h in enumerate(used_hosts)}
    n_x, n_s, n_h = len(pairs), len(placeable), len(used_hosts)
    ded_hosts = sorted({h for s, h in pairs if s.tier == "dedicated"})
    didx = {h: i for i, h in enumerate(ded_hosts)}
    col_un = n_x  # the x[s,h] are the first n_x columns
    col_rc, col_rm, col_u = n_x + n_s, n_x + n_s + n_h, n_x + n_s + 2 * n_h
    col_d = n_x + n_s + 3 * n_h
    col_over = col_d + len(ded_hosts)  # moves beyond max_moves
    n_cols = col_over + 1
    cost = np.zeros(n_cols)
    lower = np.zeros(n_cols)
    upper = np.ones(n_cols)
    integral = np.zeros(n_cols, dtype=np.uint8)
    integral[:n_x] = 1
    integral[col_d:] = 1
    big = 1000.0 * max((h.price_per_hour for h in hosts), default=1.0) + 1000.0
    cost[col_un : col_un + n_s] = big
    cost[col_over] = big / 10
    upper[col_over] = np.inf
    for h, i in hidx.items():
        host = by_name[h]
        upper[col_rc + i] = host.free_cores
        upper[col_rm + i] = host.free_memory_bytes / GIB
        cost[col_u + i] = host.price_per_hour
    rows: list[tuple[float, float, list[int], list[float]]] = []
    sidx = {s.name: i for i, s in enumerate(placeable)}
    by_service: dict[str, list[int]] = defaultdict(list)
    for k, (s, h) in enumerate(pairs):
        by_service[s.name].append(k)
        if previous.get(s.name) == h:
            cost[k] = -options.move_price
    for s in placeable:
        ks = by_service[s.name]
        rows.append((1.0, 1.0, [*ks, col_un + sidx[s.name]], [1.0] * (len(ks) + 1)))
    # one row per (failure domain, shadow host), for cores and for memory
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k, (s, h) in enumerate(pairs):
        groups[(domain_of[s.name], h)].append(k)
    for (_, h), ks in groups.items():
        i = hidx[h]
        rows.append((-np.inf, 0.0, [*ks, col_rc + i], [*(pairs[k][0].cpu_cores for k in ks), -1.0]))
        rows.append((-np.inf, 0.0, [*ks, col_rm + i], [*(pairs[k][0].memory_bytes / GIB for k in ks), -1.0]))
    for h, i in hidx.items():
        host = by_name[h]
        if host.cores > 0:
            rows.append((-np.inf, 0.0, [col_rc + i, col_u + i], [1.0 / host.cores, -1.0]))
        if host.memory_bytes > 0:
            rows.append((-np.inf, 0.0, [col_rm + i, col_u + i], [GIB / host.memory_bytes, -1.0]))
    on_host: dict[str, list[int]] = defaultdict(list)
    for k, (_, h) in enumerate(pairs):
        on_host[h].append(k)
    for h, j in didx.items():
        ks = on_host[h]
        mine = [k for k in ks if pairs[k][0].tier == "dedicated"]
        others = [k for k in ks if pairs[k][0].tier != "dedicated"]
        rows.append((-np.inf, 0.0, [*mine, col_d + j], [1.0] * len(mine) + [-1.0]))
        if others:
            rows.append(
                (
                    -np.inf,
                    float(len(others)),
                    [*others, col_d + j],
                    [1.0] * len(others) + [float(len(others))],
                )
            )
        rows.append((0.0, np.inf, [col_u + hidx[h], col_d + j], [1.0, -1.0]))
    stay = [k for k, (s, h) in enumerate(pairs) if previous.get(s.name) == h]
    if options.max_moves is not None:
        # Only services whose shadow may stay count: one whose shadow is gone must move, bound or not. The
        # bound gives way, at a price above any saving, when keeping it would leave a failure uncovered:
        # a warm-up is cheaper than a service with nowhere to go.
        rows.append(
            (float(len(stay) - options.max_moves), np.inf, [*stay, col_over], [1.0] * len(stay) + [1.0])
        )

    hs = _highs()
    hs.setOptionValue("time_limit", float(time_limit))
    hs.setOptionValue("mip_rel_gap", float(options.mip_gap))
    hs.setOptionValue("random_seed", 0)
    hs.setOptionValue("threads", 1)
    hs.addCols(
        n_cols,
        cost,
        lower,
        upper,
        0,
        np.zeros(n_cols + 1, dtype=np.int32),
        np.array([], dtype=np.int32),
        np.array([]),
    )
    starts: list[int] = []
    index: list[int] = []
    value: list[float] = []
    for _, _, idx, val in rows:
        starts.append(len(index))
        index += idx
        value += val
    hs.addRows(
        len(rows),
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        len(index),
        np.array(starts, dtype=np.int32),
        np.array(index, dtype=np.int32),
        np.array(value, dtype=np.float64),
    )
    hs.changeColsIntegrality(n_cols, np.arange(n_cols, dtype=np.int32), integral)
    warm = np.zeros(n_cols)
    for k, (sv, h) in enumerate(pairs):
        if start.get(sv.name) == h:
            warm[k] = 1.0
    placed = set(start)
    for s in placeable:
        if s.name not in placed:
            warm[col_un + sidx[s.name]] = 1.0
    for (_, h), ks in groups.items():
        i = hidx[h]
        warm[col_rc + i] = max(warm[col_rc + i], sum(pairs[k][0].cpu_cores for k in ks if warm[k] > 0.5))
        warm[col_rm + i] = max(
            warm[col_rm + i], sum(pairs[k][0].memory_bytes / GIB for k in ks if warm[k] > 0.5)
        )
    for h, i in hidx.items():
        host = by_name[h]
        warm[col_u + i] = max(
            warm[col_rc + i] / host.cores if host.cores else 0.0,
            warm[col_rm + i] * GIB / host.memory_bytes if host.memory_bytes else 0.0,
        )
    for h, j in didx.items():
        if any(warm[k] > 0.5 and pairs[k][0].tier == "dedicated" for k in on_host[h]):
            warm[col_d + j] = 1.0
            warm[col_u + hidx[h]] = 1.0
    if options.max_moves is not None:  # the start's moves beyond the bound, so that it is a solution
        stayed = sum(1 for k in stay if warm[k] > 0.5)
        warm[col_over] = max(0.0, float(len(stay) - options.max_moves - stayed))
    hs.setSolution(n_cols, np.arange(n_cols, dtype=np.int32), warm)
    hs.run()
    status = hs.getModelStatus()
    text = hs.modelStatusToString(status)
    sol = hs.getSolution()
    if sol.value_valid:
        values = np.asarray(sol.col_value)
        gap = float(hs.getInfo().mip_gap)
        solver = f"HiGHS {text.lower()}" + (
            f", gap {gap * 100:.2f} %" if np.isfinite(gap) and gap > 1e-9 else ""
        )
        shadows = {s.name: h for k, (s, h) in enumerate(pairs) if values[k] > 0.5}
    else:  # nothing from the solver in time (not even the start, which it checks first): the start itself
        solver = f"the greedy start (HiGHS: {text.lower()})"
        shadows = dict(start)
    unplaced = {s.name: "no room in every failure scenario" for s in placeable if s.name not in shadows}
    return shadows, unplaced, solver, n_x


def _greedy(
    options: Mapping[str, list[str]],
    placeable: Sequence[PoolService],
    by_name: Mapping[str, PoolHost],
    domain_of: Mapping[str, str],
    previous: Mapping[str, str],
) -> dict[str, str]:
    """A start for the solver (its first incumbent, so that a time limit still returns a good plan): keep
    every shadow that still fits where it is, then place the rest, dedicated first and the largest next,
    each where it raises the price least: on a host whose reserve for another zone already covers it, it
    costs nothing."""
    load: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    peak: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    taken: dict[str, str] = {}  # host -> "dedicated" | "shared"
    chosen: dict[str, str] = {}

    def share(host: PoolHost, cpu: float, mem: float) -> float:
        return max(
            cpu / host.cores if host.cores else 0.0, mem / host.memory_bytes if host.memory_bytes else 0.0
        )

    def fits(s: PoolService, h: str) -> tuple[bool, float]:
        host = by_name[h]
        if s.tier == "dedicated":
            return (h not in taken, host.price_per_hour)
        if taken.get(h) == "dedicated":
            return (False, 0.0)
        cpu, mem = load[h][domain_of[s.name]]
        cpu, mem = cpu + s.cpu_cores, mem + s.memory_bytes
        if cpu > host.free_cores + 1e-9 or mem > host.free_memory_bytes:
            return (False, 0.0)
        now = share(host, *peak[h])
        after = share(host, max(peak[h][0], cpu), max(peak[h][1], mem))
        return (True, host.price_per_hour * (after - now))

    def take(s: PoolService, h: str) -> None:
        chosen[s.name] = h
        taken[h] = "dedicated" if s.tier == "dedicated" else "shared"
        cell = load[h][domain_of[s.name]]
        cell[0] += s.cpu_cores
        cell[1] += s.memory_bytes
        peak[h] = [max(peak[h][0], cell[0]), max(peak[h][1], cell[1])]

    order = sorted(placeable, key=lambda s: (s.tier != "dedicated", -s.cpu_cores, s.name))
    rest = []
    for s in order:
        stay = previous.get(s.name)
        if stay in options[s.name] and fits(s, stay)[0]:
            take(s, stay)
        else:
            rest.append(s)
    for s in rest:
        best: tuple[float, float, str] | None = None
        for h in options[s.name]:
            ok, extra = fits(s, h)
            if ok and (best is None or (extra, -peak[h][0]) < best[:2]):
                best = (extra, -peak[h][0], h)
        if best is not None:
            take(s, best[2])
    return chosen


def _domain(s: PoolService, by_name: Mapping[str, PoolHost], cover_zones: bool) -> str:
    primary = by_name[s.primary]
    return primary.failure_domain if cover_zones else f"host:{primary.name}"
