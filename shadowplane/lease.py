"""Leases with fencing tokens, as an observer keeps them. Pure: time is an argument.

Every observer of a service (the controller and observer agents) keeps one `ObserverLease` per service.

- Only the coordinator makes tokens: it asks observers to *vote* for a new, higher token for one candidate.
  An observer grants renewals only of the token it last voted for, and only to that token's candidate. A
  renewal of any other token (higher: never voted for; lower: superseded) or by anyone else is refused and
  changes nothing, so only a token that a majority voted for can ever be held (no renewal can raise one).
- The owner renews its lease with every observer; a renewal round that a majority grants keeps the lease
  for `lease` seconds from when the owner *sent* it (minus a drift margin), so network delay can only
  shorten the owner's view of its lease, never lengthen it. Each grant remembers until when it holds, so a
  later change of the lease length never shortens what was already granted.
- An observer that votes refuses every renewal of an older token from then on, and reports how long until
  the renewals it already granted have run out (`wait`), and until an owner that hung right after its last
  renewal has certainly lost its address to the kernel's lifetime (`address_wait`). The coordinator lets
  the new owner add the address only after a majority voted and the longest of their waits has passed (the
  address wait when the old owner cannot confirm it let go). Any two majorities share an observer, so the
  old owner's lease has run out by then: at most one owner at any time.
- An observer that restarted has forgotten what it granted. For one lease length after it starts it grants
  nothing and reports a wait that covers anything it might have granted before.
- An owner is *renewing* with an observer while that observer's last grant of its token is less than one
  lease old (`renewing`): the one freshness rule every observer reports and the HA loop counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ObserverLease:
    promised: int = 0  # the newest token this observer knows
    holder: str = ""  # who holds `promised`
    last_grant: float = float("-inf")  # when this observer last granted any renewal (monotonic seconds)
    granted_token: int = 0  # the token of that grant (a vote moves `promised` on without granting anything)
    grants_until: float = float("-inf")  # when the latest grant of any token runs out (its lease, then)
    address_until: float = float("-inf")  # and when its owner's address has certainly expired if it hung


@dataclass(frozen=True)
class RenewDecision:
    granted: bool
    promised: int
    reason: str


@dataclass(frozen=True)
class VoteDecision:
    granted: bool
    wait: float  # seconds until every renewal granted for an older token has expired
    promised: int
    reason: str
    address_wait: float = 0.0  # seconds until a hung owner's address has certainly expired in its kernel


def renew(
    state: ObserverLease, token: int, holder: str, now: float, started_at: float, lease: float
) -> RenewDecision:
    """An owner asks to keep `token`. Mutates `state` when granted."""
    if now - started_at < lease:
        return RenewDecision(False, state.promised, "observer restarted less than one lease ago")
    if token < state.promised:
        return RenewDecision(False, state.promised, f"token {token} superseded by {state.promised}")
    if token > state.promised:
        # Tokens come from votes only: a renewal never teaches an observer a token (a host that could raise
        # one would fence the real owner and hold a token no majority chose).
        return RenewDecision(
            False, state.promised, f"token {token} was never voted for here (newest vote: {state.promised})"
        )
    if holder != state.holder:
        return RenewDecision(False, state.promised, f"token {token} belongs to {state.holder}, not {holder}")
    state.last_grant, state.granted_token = now, token
    state.grants_until = max(state.grants_until, now + lease)
    state.address_until = max(state.address_until, now + lease + address_expiry_seconds(lease))
    return RenewDecision(True, token, "granted")


def vote(
    state: ObserverLease, token: int, candidate: str, now: float, started_at: float, lease: float
) -> VoteDecision:
    """The coordinator asks this observer to promise `token` to `candidate`. Idempotent for a repeat."""
    if token < state.promised or (token == state.promised and candidate != state.holder):
        return VoteDecision(False, 0.0, state.promised, f"already promised token {state.promised}")
    state.promised, state.holder = token, candidate
    # Renewals granted before the vote end when their lease (as it was then) ends; whatever we granted before
    # a restart we cannot remember ended at most one lease after it.
    wait = max(0.0, max(state.grants_until, started_at + lease) - now)
    # An owner that hung (or lost its agent) after its last renewal keeps its address until the kernel's
    # lifetime runs out: it refreshed that lifetime at the latest when its lease ended, with a lifetime no
    # longer than that lease's (`address_lifetime_seconds`).
    forgotten = started_at + lease + address_expiry_seconds(lease)
    address_wait = max(0.0, max(state.address_until, forgotten) - now)
    return VoteDecision(True, wait, token, "granted", address_wait)


def renewing(
    state: ObserverLease, holder: str, token: int, now: float, started_at: float, lease: float
) -> bool | None:
    """Is `holder` keeping `token` alive with this observer? None (unknown) for two leases after the
    observer started: it grants nothing for the first one, and the owner needs a round to be heard again."""
    if now - started_at < 2 * lease:
        return None
    return state.holder == holder and state.granted_token == token and now - state.last_grant < lease


def address_lifetime_seconds(lease: float) -> int:
    """Kernel lifetime of a held VIP: one lease rounded up to the kernel's whole seconds. The owner refreshes
    it while its lease is valid, and never after; it is what removes the address of an owner whose agent
    hung or died without cleaning up, so it is kept as short as the kernel allows: a move that cannot hear
    the old owner waits it out (`address_expiry_seconds`)."""
    return max(1, math.ceil(lease))


def address_expiry_seconds(lease: float) -> float:
    """Longest time after its last refresh that the kernel may keep an address with that lifetime: the
    lifetime, plus one second because the kernel checks lifetimes at most once a second
    (net/ipv4/devinet.c check_lifetime, net/ipv6/addrconf.c addrconf_verify: ADDRCONF_TIMER_FUZZ_MAX)."""
    return address_lifetime_seconds(lease) + 1.0


def wait_ms(seconds: float) -> int:
    """A wait on the wire, in whole ms rounded up: rounding may lengthen a wait, never shorten it."""
    return int(seconds * 1000 + 0.999)


def majority(n: int) -> int:
    return n // 2 + 1


def owner_valid_until(round_sent_at: float, lease: float, drift_margin: float) -> float:
    """How long an owner may hold the address after a renewal round that a majority granted."""
    return round_sent_at + lease * (1.0 - drift_margin)
