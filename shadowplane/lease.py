"""Leases with fencing tokens, as an observer keeps them. Pure: time is an argument.

Every observer of a service (the controller and observer agents) keeps one `ObserverLease` per service.

- The owner renews its lease with every observer; a renewal round that a majority grants keeps the lease
  for `lease` seconds from when the owner *sent* it (minus a drift margin), so network delay can only
  shorten the owner's view of its lease, never lengthen it.
- The coordinator moves the service by asking observers to vote for a new, higher token. An observer that
  votes refuses every renewal of an older token from then on, and reports how long until the renewals it
  already granted have run out (`wait`). The coordinator lets the new owner add the address only after a
  majority voted and the longest of their waits has passed. Any two majorities share an observer, so the
  old owner's lease has run out by then: at most one owner at any time.
- An observer that restarted has forgotten what it granted. For one lease length after it starts it grants
  nothing and reports a wait that covers anything it might have granted before.
- Tokens are unique to one candidate (the coordinator hands each out once), so an observer may adopt a
  higher token it hears about in a renewal: that can only make it refuse older ones.
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


def renew(
    state: ObserverLease, token: int, holder: str, now: float, started_at: float, lease: float
) -> RenewDecision:
    """An owner asks to keep `token`. Mutates `state` when granted."""
    if now - started_at < lease:
        return RenewDecision(False, state.promised, "observer restarted less than one lease ago")
    if token < state.promised:
        return RenewDecision(False, state.promised, f"token {token} superseded by {state.promised}")
    if token == state.promised and holder != state.holder:
        return RenewDecision(False, state.promised, f"token {token} belongs to {state.holder}, not {holder}")
    state.promised, state.holder = token, holder
    state.last_grant, state.granted_token = now, token
    return RenewDecision(True, token, "granted")


def vote(
    state: ObserverLease, token: int, candidate: str, now: float, started_at: float, lease: float
) -> VoteDecision:
    """The coordinator asks this observer to promise `token` to `candidate`. Idempotent for a repeat."""
    if token < state.promised or (token == state.promised and candidate != state.holder):
        return VoteDecision(False, 0.0, state.promised, f"already promised token {state.promised}")
    state.promised, state.holder = token, candidate
    # Renewals granted before the vote (or before a restart we cannot remember) end at most one lease
    # after they were granted.
    latest_unknown = max(state.last_grant, started_at)
    wait = max(0.0, latest_unknown + lease - now)
    return VoteDecision(True, wait, token, "granted")


def renewing(
    state: ObserverLease, holder: str, token: int, now: float, started_at: float, lease: float
) -> bool | None:
    """Is `holder` keeping `token` alive with this observer? None (unknown) for two leases after the
    observer started: it grants nothing for the first one, and the owner needs a round to be heard again."""
    if now - started_at < 2 * lease:
        return None
    return state.holder == holder and state.granted_token == token and now - state.last_grant < lease


def address_lifetime_seconds(lease: float) -> int:
    """Kernel lifetime of a held VIP: a few leases, at least 2 s (the kernel counts whole seconds). The
    owner keeps refreshing it; it only matters if the owner's agent hangs or dies without cleaning up."""
    return max(2, math.ceil(lease * 4))


def majority(n: int) -> int:
    return n // 2 + 1


def owner_valid_until(round_sent_at: float, lease: float, drift_margin: float) -> float:
    """How long an owner may hold the address after a renewal round that a majority granted."""
    return round_sent_at + lease * (1.0 - drift_margin)
