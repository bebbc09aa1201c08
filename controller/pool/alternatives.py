"""What an operator would do without the pool, priced and counted the same way, for `shadowctl pool plan`
and the benchmark to set beside the pool's plan:

- dedicated 1:1: each primary host gets a twin of its own size and price in another zone (a keepalived
  pair): every single-host and single-zone failure is covered, at the price of a second fleet;
- naive N+1 per zone: each zone keeps one spare host, the cheapest of the fleet's host types that holds the
  zone's largest single-host demand: every single-host failure is covered, no zone failure (the spare
  fails with its zone)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from controller.pool.coverage import scenarios
from controller.pool.model import PoolHost, PoolService


@dataclass(frozen=True)
class Alternative:
    name: str
    price_per_hour: float
    reserved_cores: float
    reserved_memory_bytes: int
    host_scenarios: int
    host_covered: int
    zone_scenarios: int
    zone_covered: int
    note: str


def dedicated_twins(hosts: Sequence[PoolHost], services: Sequence[PoolService]) -> Alternative:
    by_name = {h.name: h for h in hosts}
    primaries = sorted({s.primary for s in services if s.primary in by_name})
    sc = scenarios(hosts, services)
    n_host = sum(1 for x in sc if x.kind == "host")
    n_zone = len(sc) - n_host
    return Alternative(
        name="dedicated 1:1",
        price_per_hour=sum(by_name[p].price_per_hour for p in primaries),
        reserved_cores=sum(by_name[p].cores for p in primaries),
        reserved_memory_bytes=sum(by_name[p].memory_bytes for p in primaries),
        host_scenarios=n_host,
        host_covered=n_host,
        zone_scenarios=n_zone,
        zone_covered=n_zone,
        note=f"{len(primaries)} twin hosts, each the size of its primary, in another zone",
    )


def n_plus_one(hosts: Sequence[PoolHost], services: Sequence[PoolService]) -> Alternative:
    by_name = {h.name: h for h in hosts}
    demand: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s in services:
        if s.primary in by_name:
            demand[s.primary][0] += s.cpu_cores
            demand[s.primary][1] += s.memory_bytes
    types = sorted({(h.cores, h.memory_bytes, h.price_per_hour) for h in hosts}, key=lambda t: t[2])
    per_zone: dict[str, list[str]] = defaultdict(list)
    for p in demand:
        per_zone[by_name[p].failure_domain].append(p)
    price = cores = 0.0
    memory = 0
    covered = 0
    missing = []
    for zone, members in sorted(per_zone.items()):
        need_cpu = max(demand[p][0] for p in members)
        need_mem = max(demand[p][1] for p in members)
        spare = next((t for t in types if t[0] >= need_cpu and t[1] >= need_mem), None)
        if spare is None:
            missing.append(zone)
            continue
        price += spare[2]
        cores += spare[0]
        memory += spare[1]
        covered += sum(1 for p in members if demand[p][0] <= spare[0] and demand[p][1] <= spare[1])
    sc = scenarios(hosts, services)
    return Alternative(
        name="naive N+1 per zone",
        price_per_hour=price,
        reserved_cores=cores,
        reserved_memory_bytes=memory,
        host_scenarios=sum(1 for x in sc if x.kind == "host"),
        host_covered=covered,
        zone_scenarios=sum(1 for x in sc if x.kind == "zone"),
        zone_covered=0,
        note=f"one spare host per zone ({len(per_zone) - len(missing)} zones)"
        + (f"; no host type holds the largest host of {', '.join(missing)}" if missing else ""),
    )
