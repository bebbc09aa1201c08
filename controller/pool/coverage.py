"""An independent count of what a placement covers: every single-host and every single-zone failure, one
at a time, with the services it fails and where each lands. It shares nothing with the solver but the data,
so a plan the solver got wrong shows here (the benchmark and the tests judge every plan by this count)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.pool.model import Coverage, PoolHost, PoolService, Reserve, Shortfall

# Demand is compared with a tolerance: the solver works in floating point, and one core in a million is
# no shortfall anyone could measure.
EPS = 1e-6


@dataclass(frozen=True)
class Scenario:
    kind: str  # "host" | "zone"
    name: str  # the host's or the zone's name
    failed: frozenset[str]  # hosts down in it

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


def scenarios(hosts: Sequence[PoolHost], services: Sequence[PoolService]) -> list[Scenario]:
    """Each host that runs a primary fails alone; each zone with such a host fails whole. A host with no
    zone is its own failure domain: its failure is counted once, as a host."""
    primaries = {s.primary for s in services}
    out = [Scenario("host", h.name, frozenset({h.name})) for h in hosts if h.name in primaries]
    zones: dict[str, set[str]] = defaultdict(set)
    for h in hosts:
        if h.zone:
            zones[h.zone].add(h.name)
    out += [
        Scenario("zone", z, frozenset(members)) for z, members in sorted(zones.items()) if members & primaries
    ]
    return out


def eligible(service: PoolService, shadow: PoolHost, primary: PoolHost) -> str | None:
    """Why `shadow` may not back `service` (None: it may). The rules every placement keeps."""
    if shadow.name == primary.name:
        return "the primary itself"
    if shadow.failure_domain == primary.failure_domain:
        return f"in the primary's zone {primary.zone}"
    if not shadow.usable:
        return "not usable (down, or its zone degraded)"
    if service.shadow_class and shadow.perf_class != service.shadow_class:
        return f"perf_class {shadow.perf_class or '(none)'}, the service asks for {service.shadow_class}"
    for key in service.spread_by:
        mine = primary.label(key)
        if mine is not None and shadow.label(key) == mine:
            return f"same {key} ({mine}) as the primary"
    return None


def check(
    hosts: Sequence[PoolHost],
    services: Sequence[PoolService],
    shadows: Mapping[str, str],
    cover_zones: bool = True,
) -> Coverage:
    by_name = {h.name: h for h in hosts}
    by_primary: dict[str, list[PoolService]] = defaultdict(list)
    for s in services:
        by_primary[s.primary].append(s)
    shortfalls: list[Shortfall] = []
    users: dict[str, list[PoolService]] = defaultdict(list)
    for s in services:
        if shadows.get(s.name):
            users[shadows[s.name]].append(s)
    dedicated = {h for h, us in users.items() if any(u.tier == "dedicated" for u in us)}
    # the most each shadow host must hold in any one scenario, and which scenario that is
    peak_cpu: dict[str, tuple[float, str]] = {}
    peak_mem: dict[str, tuple[int, str]] = {}
    counts = {"host": [0, 0], "zone": [0, 0]}
    for sc in scenarios(hosts, services):
        if sc.kind == "zone" and not cover_zones:
            continue
        counts[sc.kind][0] += 1
        ok = True
        load: dict[str, tuple[float, int]] = {}
        for s in (s for failed in sorted(sc.failed) for s in by_primary.get(failed, ())):
            target = shadows.get(s.name, "")
            primary = by_name.get(s.primary)
            host = by_name.get(target)
            why = None
            if not target or host is None or primary is None:
                why = "no shadow"
            elif target in sc.failed:
                why = f"its shadow {target} fails with it"
            else:
                why = eligible(s, host, primary)
                if why is None and s.tier == "dedicated" and len(users[target]) > 1:
                    why = f"dedicated, but {target} backs other services too"
            if why:
                ok = False
                shortfalls.append(Shortfall(sc.describe(), s.name, why))
                continue
            cpu, mem = load.get(target, (0.0, 0))
            load[target] = (cpu + s.cpu_cores, mem + s.memory_bytes)
        for target, (cpu, mem) in load.items():
            h = by_name[target]
            if cpu > h.free_cores + EPS or mem > h.free_memory_bytes + EPS:
                ok = False
                landing = sorted(u.name for u in users[target] if u.primary in sc.failed)
                shortfalls.append(
                    Shortfall(
                        sc.describe(),
                        ",".join(landing),
                        f"{target} would need {cpu:.2f} cores / {mem / 2**30:.1f} GiB, has "
                        f"{h.free_cores:.2f} / {h.free_memory_bytes / 2**30:.1f} free",
                    )
                )
            if cpu > peak_cpu.get(target, (-1.0, ""))[0]:
                peak_cpu[target] = (cpu, sc.describe())
            if mem > peak_mem.get(target, (-1, ""))[0]:
                peak_mem[target] = (mem, sc.describe())
        counts[sc.kind][1] += ok
    reserves = []
    for name in sorted(set(peak_cpu) | dedicated):
        h = by_name[name]
        cpu, worst_c = peak_cpu.get(name, (0.0, ""))
        mem, worst_m = peak_mem.get(name, (0, ""))
        c_share = cpu / h.cores if h.cores else 0.0
        m_share = mem / h.memory_bytes if h.memory_bytes else 0.0
        share = 1.0 if name in dedicated else min(1.0, max(c_share, m_share))
        worst = worst_c if c_share >= m_share else worst_m
        reserves.append(Reserve(name, cpu, mem, h.price_per_hour * share, worst, dedicated=name in dedicated))
    return Coverage(
        host_scenarios=counts["host"][0],
        host_covered=counts["host"][1],
        zone_scenarios=counts["zone"][0],
        zone_covered=counts["zone"][1],
        shortfalls=tuple(shortfalls),
        reserves=tuple(reserves),
        price_per_hour=sum(r.price_per_hour for r in reserves),
    )
