"""Leadership among controller replicas, as pure rules of what one replica knows. No I/O, no clock.

A replica leads while the leader key in the DCS names it, attached to its DCS lease (created only where no
key exists: compare-and-set). It *acts* as leader (orchestrates failovers, scales) only until
`acting_until`: the time it *sent* the last lease renewal the store confirmed, plus the lease's TTL less a
margin for the two clocks' rates. The store expires that lease no earlier than one TTL after it *received*
that renewal, which is after it was sent, and only then can another replica create the key. So a leader
cut off from the store stops acting before any other replica can start: two leaders never act at once,
and the bound is TTL x (1 - margin) after its last confirmed renewal was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TTL_SECONDS = 3  # etcd grants whole seconds; a new leader acts at most this (plus a campaign) later
DEFAULT_MARGIN = 0.1  # clock-rate drift between this host and the etcd leader's, with room


@dataclass(frozen=True)
class Term:
    """This replica's hold on the leader key."""

    lease: int  # the DCS lease the key is attached to
    ttl_seconds: float
    confirmed_sent_at: (
        float  # monotonic seconds: when the last renewal (or grant) the store confirmed was sent
    )


def acting_until(term: Term, margin: float = DEFAULT_MARGIN) -> float:
    return term.confirmed_sent_at + term.ttl_seconds * (1.0 - margin)


@dataclass(frozen=True)
class Standing:
    acting: bool
    reason: str


def standing(
    term: Term | None, now: float, leader: str, margin: float = DEFAULT_MARGIN, campaigning: bool = True
) -> Standing:
    """Whether this replica may act as leader now, and why (or why not)."""
    if term is None:
        if leader:
            return Standing(False, f"following {leader}")
        if not campaigning:  # a vacant shard the ring gives another replica (shards.py)
            return Standing(False, "no leader known (left to another replica)")
        return Standing(False, "no leader known (campaigning)")
    left = acting_until(term, margin) - now
    if left <= 0:
        return Standing(
            False,
            f"no lease renewal confirmed for {now - term.confirmed_sent_at:.2f} s "
            f"(TTL {term.ttl_seconds:g} s): another replica may lead once the store expires it",
        )
    return Standing(True, f"leader (lease {term.lease:x}, {left:.2f} s left without a renewal)")
