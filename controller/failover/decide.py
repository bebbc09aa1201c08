"""The failover decision, as a pure function of one snapshot of a service. No I/O, no clock.

Each decision carries its reason; the HA loop logs it and records it as an event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shadowplane.lease import majority

Action = Literal["none", "place", "failover", "failback", "move", "reacquire"]


@dataclass(frozen=True)
class Tally:
    """Observers' votes on one question (is X up? is the owner renewing?). Unknown never counts."""

    up: int = 0
    down: int = 0
    voters: int = 0
    down_by: tuple[str, ...] = ()

    @property
    def majority_up(self) -> bool:
        return self.voters > 0 and self.up >= majority(self.voters)

    @property
    def majority_down(self) -> bool:
        return self.voters > 0 and self.down >= majority(self.voters)

    def describe(self) -> str:
        return f"{self.down} of {self.voters} observers say down, {self.up} up"


def tally(observers: Sequence[str], views: Mapping[str, bool], exclude: str = "") -> Tally:
    """Count the views of the configured observers (a host never votes on itself)."""
    voters = [o for o in observers if o != exclude]
    up = sum(1 for o in voters if views.get(o) is True)
    down_by = tuple(o for o in voters if views.get(o) is False)
    return Tally(up, len(down_by), len(voters), down_by)


@dataclass(frozen=True)
class Request:
    kind: Literal["failover", "failback"]
    to: str = ""
    force: bool = False


@dataclass(frozen=True)
class Snapshot:
    name: str
    primary: str
    shadows: tuple[str, ...]
    failback: str
    failback_hold_ms: int
    flap_window_ms: int
    owner: str
    token: int
    last_failover_ms: int
    health: Mapping[str, Tally]  # per host: is its service up?
    renewing: Tally  # is the owner still renewing its lease with the observers?
    connected: frozenset[str]
    primary_up_since_ms: int | None
    now_ms: int
    primary_grace_over: bool = True  # the controller has waited long enough for primaries to connect
    request: Request | None = None
    # How long a majority has said the owner stopped renewing, and how long health checks take to see a
    # target down (fall x interval + timeout): a lease shorter than detection lapses first when an owner is
    # cut off, and only the health checks can tell that from an agent's hiccup.
    renewing_down_for_ms: int = 0
    detection_ms: int = 0
    last_transition_ms: int = 0  # when the service last moved (or was placed)
    # Placements in a row that ended without an owner (votes not in, acquire failed), and how long ago the
    # last ended (a monotonic clock's difference: a wall clock stepped back must not hold a placement)
    failed_placements: int = 0
    failed_ago_ms: int = 0
    # Hosts of degraded zones (controller/pool/zones.py) -> why: nothing lands there while a host outside
    # them is ready (nor an operator's move there without --force), and nothing fails back there. Empty:
    # every zone healthy.
    degraded: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    action: Action
    target: str = ""
    reason: str = ""
    planned: bool = False  # the old owner's agent is reachable: release first, then no lease wait
    damped: bool = False
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.action != "none"


NONE = Decision("none")
# The wait before the second retry of a placement that failed, and the longest wait (see retry_wait_ms)
RETRY_FIRST_MS = 500
RETRY_MAX_MS = 8000
# What the status says of a service without shadows, and why nothing ever moves it.
NO_SHADOW = "no shadow: failover disabled (service.shadows is empty)"


def ready(s: Snapshot, host: str) -> bool:
    return host in s.connected and s.health.get(host, Tally()).majority_up


def candidates(s: Snapshot, exclude: str) -> list[str]:
    """Where the service may go, best first: back to the primary if it is fine, else shadows in order;
    hosts of degraded zones only after every other (a last resort: a service on a host of a failing zone
    is better than a service down)."""
    order = [s.primary, *s.shadows] if exclude != s.primary else list(s.shadows)
    ok = [h for h in order if h != exclude and ready(s, h)]
    return [h for h in ok if h not in s.degraded] + [h for h in ok if h in s.degraded]


def last_resort(s: Snapshot, host: str) -> str:
    """What a reason adds when `host` is in a degraded zone."""
    if host not in s.degraded:
        return ""
    return f"; {host} is in a degraded zone, the only ready host ({s.degraded[host]})"


def damped(s: Snapshot) -> bool:
    return s.last_failover_ms > 0 and s.now_ms - s.last_failover_ms < s.flap_window_ms


def retry_wait_ms(name: str, failed: int) -> int:
    """How long a service without an owner waits before placing again after `failed` attempts in a row
    ended without one. The first retry is at once (one lost vote, one slow agent); then a doubling wait,
    from RETRY_FIRST_MS to RETRY_MAX_MS, each spread over its upper half by a hash of the service and the
    count (the same in every replica and every run: the pure core draws no random numbers). Without it,
    a controller whose votes time out under load (2,000 agents connecting while 500 services are placed)
    placed every service again on the next tick, 20 times a second: each retry more load, more timeouts."""
    if failed < 2:
        return 0
    cap = min(RETRY_MAX_MS, RETRY_FIRST_MS << min(failed - 2, 16))
    spread = int.from_bytes(hashlib.blake2b(f"{name}/{failed}".encode(), digest_size=2).digest(), "big")
    return cap // 2 + (cap // 2) * spread // 0xFFFF


def decide(s: Snapshot) -> Decision:
    if s.request is not None:
        return _requested(s, s.request)
    if not s.owner and s.failed_placements:
        wait = retry_wait_ms(s.name, s.failed_placements)
        if wait > s.failed_ago_ms:
            return Decision(
                "none",
                "",
                f"no owner; {s.failed_placements} placements in a row failed: the next "
                f"{wait / 1000:.1f} s after the last",
            )
    if not s.owner:
        best = candidates(s, "")
        if best and best[0] == s.primary:
            return Decision(
                "place", s.primary, f"no owner; primary {s.primary} is up{last_resort(s, s.primary)}"
            )
        if best and s.primary_grace_over:
            state = "in a degraded zone" if ready(s, s.primary) else "not ready"
            why = f"no owner; primary {s.primary} is {state}, {best[0]} is{last_resort(s, best[0])}"
            return Decision("place", best[0], why)
        return NONE
    owner_health = s.health.get(s.owner, Tally())
    if owner_health.majority_down:
        best = candidates(s, s.owner)
        why = f"owner {s.owner} is down ({owner_health.describe()}: {', '.join(owner_health.down_by)})"
        if not s.shadows:
            return Decision("none", "", f"{why}; {NO_SHADOW}")
        if not best:
            return Decision("none", "", f"{why}; no ready host to take over")
        why += last_resort(s, best[0])
        if damped(s):
            ago = (s.now_ms - s.last_failover_ms) / 1000
            return Decision(
                "none",
                best[0],
                f"{why}; failover damped: the last one was {ago:.0f} s ago "
                f"(flap window {s.flap_window_ms / 1000:.0f} s); shadowctl failover --force overrides",
                damped=True,
            )
        return Decision("failover", best[0], why, planned=s.owner in s.connected)
    if s.renewing.majority_down:
        why = f"owner {s.owner} stopped renewing its lease ({s.renewing.describe()})"
        if s.renewing_down_for_ms < s.detection_ms:
            # Cut off, or an agent's hiccup? The health checks are about to say; reacquiring on a host that
            # is cut off would only wait for it to answer.
            return Decision(
                "none",
                "",
                f"{why}; waiting for the health checks "
                f"(they take up to {s.detection_ms} ms to see a host down)",
            )
        if s.owner in s.connected and owner_health.majority_up:
            return Decision(
                "reacquire", s.owner, f"{why}; its agent is connected, so it takes a new token", planned=True
            )
        best = candidates(s, s.owner)
        if not s.shadows:
            return Decision("none", "", f"{why}; {NO_SHADOW}")
        if not best:
            return Decision("none", "", f"{why}; no ready host to take over")
        why += last_resort(s, best[0])
        # The owner's agent is gone, or its service is not seen up: it may still hold the VIP, which only the
        # kernel's address lifetime guarantees gone; the orchestrator waits that out unless it confirms.
        connected = s.owner in s.connected
        state = "its service is not seen up by a majority" if connected else "its agent is gone"
        return Decision("failover", best[0], f"{why} and {state}", planned=connected)
    # The hold counts from the later of the primary's recovery and the last move: an operator's move away
    # from a healthy primary stands for the hold too, rather than being undone on the next tick.
    healthy_since = max(s.primary_up_since_ms or 0, s.last_transition_ms)
    if (
        s.owner != s.primary
        and s.failback == "auto"
        and ready(s, s.primary)
        and s.primary not in s.degraded
        and s.primary_up_since_ms is not None
        and s.now_ms - healthy_since >= s.failback_hold_ms
    ):
        held = (s.now_ms - healthy_since) / 1000
        return Decision(
            "failback",
            s.primary,
            f"primary {s.primary} healthy for {held:.1f} s (hold {s.failback_hold_ms / 1000:.1f} s)",
            planned=s.owner in s.connected,
        )
    return NONE


def _requested(s: Snapshot, r: Request) -> Decision:
    if r.kind == "failback":
        if s.owner == s.primary:
            return Decision("none", "", f"already on the primary {s.primary}")
        if not ready(s, s.primary):
            return Decision("none", "", f"primary {s.primary} is not ready (connected and up by a majority)")
        if s.primary in s.degraded and not r.force:
            return Decision(
                "none", "", f"primary {s.primary}: {s.degraded[s.primary]}; add --force to move there"
            )
        return Decision(
            "failback", s.primary, "failback requested by an operator", planned=s.owner in s.connected
        )
    if not s.shadows:
        return Decision("none", "", f"{NO_SHADOW}: add shadow hosts to move {s.name}")
    if r.to:
        if r.to not in (s.primary, *s.shadows):
            return Decision("none", "", f"{r.to} is neither the primary nor a shadow of {s.name}")
        if r.to == s.owner:
            return Decision("none", "", f"{r.to} already owns {s.name}")
        if not ready(s, r.to):
            return Decision("none", "", f"{r.to} is not ready (connected and up by a majority)")
        target = r.to
    else:
        best = candidates(s, s.owner)
        if not best:
            return Decision("none", "", "no ready host to move to")
        target = best[0]
    if target in s.degraded and not r.force:
        return Decision("none", "", f"{target}: {s.degraded[target]}; add --force to move there")
    if damped(s) and not r.force:
        return Decision("none", target, "failover damped (flap window); add --force to override", damped=True)
    return Decision(
        "move",
        target,
        "failover requested by an operator" + (" (forced)" if r.force else ""),
        planned=s.owner in s.connected,
    )
