"""Zone health, pure: a zone is degraded when at least a configured share of its hosts, and at least a
configured number of them, are down or cut off (their agents not heard from, or a majority of a service's
observers seeing them down). No failover, failback or placement lands on a host of a degraded zone while a
host elsewhere is ready (failover/decide.py), and the reason says which hosts are down. A zone of one host
is degraded when that host is down, as the host itself is."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ZoneHealth:
    zone: str
    hosts: tuple[str, ...]
    down: tuple[tuple[str, str], ...]  # (host, why), by host
    degraded: bool
    reason: str

    @property
    def down_share(self) -> float:
        return len(self.down) / len(self.hosts) if self.hosts else 0.0


def zone_health(
    zones: Mapping[str, str], down: Mapping[str, str], degraded_share: float, min_hosts: int = 2
) -> tuple[ZoneHealth, ...]:
    """`zones`: host -> zone (hosts without a zone are left out: they are no zone's); `down`: host -> why
    it is down. One entry per zone, by name."""
    members: dict[str, list[str]] = defaultdict(list)
    for host, zone in zones.items():
        if zone:
            members[zone].append(host)
    out = []
    for zone, hosts in sorted(members.items()):
        gone = tuple(sorted((h, down[h]) for h in hosts if h in down))
        share = len(gone) / len(hosts)
        # at least min_hosts down: in a zone of two, one host down is that host's failure, not the zone's
        degraded = len(gone) >= min(min_hosts, len(hosts)) and share >= degraded_share
        if degraded:
            names = ", ".join(f"{h} ({why})" for h, why in gone)
            reason = (
                f"zone {zone} degraded: {len(gone)} of {len(hosts)} hosts down "
                f"(>= {degraded_share:.0%}): {names}"
            )
        elif gone:
            reason = (
                f"{len(gone)} of {len(hosts)} hosts down (degraded at {degraded_share:.0%} and at least "
                f"{min(min_hosts, len(hosts))})"
            )
        else:
            reason = "every host up"
        out.append(ZoneHealth(zone, tuple(sorted(hosts)), gone, degraded, reason))
    return tuple(out)


def degraded_hosts(health: tuple[ZoneHealth, ...]) -> dict[str, str]:
    """Every host of a degraded zone -> the zone's reason: where nothing may land."""
    return {h: z.reason for z in health if z.degraded for h in z.hosts}
