"""`shadowctl pool plan`: the pool's inputs from the controller's configuration and state, and the report
it shows, computed in a process of its own (the solver and the greedy start hold the GIL for seconds,
which a thread would take from the loop that answers renewals).

The report sets side by side, counted by the same independent count (coverage.py): the pool's plan for
every service with failover (its shadow chosen as if `shadows` were left to the pool), the shadows the
configuration names today (the first of each list), and the dedicated 1:1 and naive N+1 alternatives."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Collection, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from controller.config import ControllerConfig
from controller.failover.decide import tally
from controller.pool.alternatives import Alternative, dedicated_twins, n_plus_one
from controller.pool.coverage import check
from controller.pool.model import Coverage, Plan, PoolHost, PoolService
from controller.pool.placement import PlanOptions, plan

GIB = 2**30
NICENESS = 10


@dataclass(frozen=True)
class PoolInputs:
    hosts: tuple[PoolHost, ...]
    services: tuple[PoolService, ...]  # the services with failover and a forecast
    configured: tuple[tuple[str, str], ...]  # (service, its first configured shadow)
    not_placed: tuple[tuple[str, str], ...]  # (service, why it is not in the plan)
    notes: tuple[str, ...]


@dataclass(frozen=True)
class PoolReport:
    inputs: PoolInputs
    plan: Plan
    configured_coverage: Coverage
    alternatives: tuple[Alternative, ...]


def pool_inputs(
    cfg: ControllerConfig,
    reported: Mapping[str, tuple[float, int]],
    demand: Mapping[str, tuple[float, int]],
    down: Collection[str],
) -> PoolInputs:
    """`reported`: host -> (cores, bytes) its agent reported; `demand`: service -> forecast (cores, bytes)
    at the pool's quantile; `down`: hosts down, cut off, or in a degraded zone (nothing lands there)."""
    priced = any(h.price_per_hour > 0 for h in cfg.host)
    used: dict[str, list[float]] = {}
    for svc in cfg.service:
        if svc.name in demand:
            cell = used.setdefault(svc.primary, [0.0, 0.0])
            cell[0] += demand[svc.name][0]
            cell[1] += demand[svc.name][1]
    hosts, notes = [], []
    for h in cfg.host:
        cores = h.cores or reported.get(h.name, (0.0, 0))[0]
        memory = int(h.memory_gib * GIB) or reported.get(h.name, (0.0, 0))[1]
        if not cores or not memory:
            notes.append(
                f"{h.name}: no size (set cores and memory_gib in its [[host]], or connect its agent): it "
                "holds no shadow"
            )
        c, m = used.get(h.name, [0.0, 0.0])
        hosts.append(
            PoolHost(
                name=h.name,
                zone=h.zone,
                cores=float(cores),
                memory_bytes=int(memory),
                # unpriced fleets: every core costs the same, so the plan reserves the fewest cores
                price_per_hour=h.price_per_hour if priced else float(cores),
                perf_class=h.perf_class,
                labels=tuple(sorted(h.labels.items())),
                used_cores=c,
                used_memory_bytes=int(m),
                usable=h.shadow_pool and h.name not in down and bool(cores and memory),
            )
        )
    services, not_placed, configured = [], [], []
    zone_of = {h.name: h.zone for h in cfg.host}
    for svc in cfg.service:
        if not svc.shadows:
            continue  # no failover: its primary's demand is counted on its host, nothing is placed
        problem = zone_quorum_problem(svc.observer_names(), [svc.primary, *svc.shadows], zone_of)
        if problem:
            notes.append(f"{svc.name}: {problem}")
        configured.append((svc.name, svc.shadows[0]))
        if svc.name not in demand:
            not_placed.append(
                (svc.name, "no forecast of its primary's demand yet (shadowctl plan shows why)")
            )
            continue
        cpu, mem = demand[svc.name]
        services.append(
            PoolService(
                name=svc.name,
                primary=svc.primary,
                cpu_cores=cpu,
                memory_bytes=mem,
                tier=svc.tier,
                spread_by=tuple(svc.spread_by),
                shadow_class=svc.shadow_class,
            )
        )
    return PoolInputs(tuple(hosts), tuple(services), tuple(configured), tuple(not_placed), tuple(notes))


def zone_quorum_problem(observers: list[str], hosts: list[str], zone_of: Mapping[str, str]) -> str | None:
    """Whether some zone's failure would leave none of the service's hosts elsewhere (`hosts`: primary and
    shadows) judged ready: a host is ready when more than half of the observers other than itself see it
    up, and an observer in the failed zone is no vote. Then nothing can move when that zone fails."""
    for zone in sorted({zone_of[o] for o in observers if zone_of.get(o)}):
        lost = {o for o in observers if zone_of.get(o) == zone}
        elsewhere = [h for h in hosts if zone_of.get(h) != zone]
        if not elsewhere:
            continue  # every host of the service is in that zone: nothing to move to anyway

        # the HA loop's own count: every observer outside the zone sees the host up, those in it say nothing
        seen = {o: True for o in observers if o not in lost}
        if not any(tally(observers, seen, exclude=h).majority_up for h in elsewhere):
            return (
                f"zone {zone} holds {len(lost)} of its {len(observers)} observers ({', '.join(observers)}): "
                f"if {zone} fails, no host elsewhere has a majority of the other observers seeing it up, and "
                "the service cannot move; spread observers across zones (e.g. the controller and one host "
                "per zone)"
            )
    return None


def pool_report(inputs: PoolInputs, options: PlanOptions) -> PoolReport:
    hosts, services = inputs.hosts, inputs.services
    configured = dict(inputs.configured)
    p = plan(hosts, services, configured, options)
    return PoolReport(
        inputs=inputs,
        plan=p,
        configured_coverage=check(hosts, services, configured, options.cover_zones),
        alternatives=(dedicated_twins(hosts, services), n_plus_one(hosts, services)),
    )


def _lower_priority() -> None:
    os.nice(NICENESS)


def report_in_child(inputs: PoolInputs, options: PlanOptions) -> PoolReport:
    """`pool_report` in a spawned, niced process (not forked: gRPC's threads); blocks: run it from a thread
    or an executor."""
    with ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=_lower_priority
    ) as pool:
        return pool.submit(pool_report, inputs, options).result()
