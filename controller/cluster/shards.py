"""Services divided among controller replicas, as pure rules of what one replica knows. No I/O, no clock.

The services are cut into a fixed number of shards (`[cluster] shards`); a service's shard is a hash of its
name, so every replica computes the same one. Each shard is led as the whole cluster is with one shard: a
leader key per shard on the holder's DCS lease, created only where none exists, acted on under
`leadership.py`'s rule. That rule holds per key, so two replicas never act for one shard (one service) at
once, whatever the division below says: the division only decides who *campaigns* for a vacant shard and
who *hands a shard over*.

Who should hold a shard: rendezvous hashing with a bound over the live replicas (each has a membership key on
its own DCS lease; `preferred`): every replica gets its share, and a change of membership moves few shards.
Each move is a short gap for its services (the holder resigns, the ring's choice campaigns at its next round
and reads the shared state before acting), as a change of leader is with one shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

# A replica that has just joined is given shards only after this long a membership: one that flaps (a
# restart loop, a store it reaches only now and then) does not pull shards back and forth.
DEFAULT_SETTLE_SECONDS = 10.0


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def shard_of(service: str, shards: int) -> int:
    """The shard a service belongs to: the same on every replica and across restarts."""
    return _h(service) % shards if shards > 1 else 0


def preferred(shard: int, shards: int, members: Mapping[str, float] | list[str]) -> str:
    """The member that should hold `shard` of `shards`; "" when there is none. Rendezvous hashing with a
    bound: each shard in turn goes to the member ranking it highest among those holding fewer than
    ceil(shards / members), so no replica carries more than its share (plain rendezvous hashing gave one
    of three replicas none of eight shards), and a change of membership still moves few shards."""
    return assignment(shards, members).get(shard, "")


def assignment(shards: int, members: Mapping[str, float] | list[str]) -> dict[int, str]:
    """shard -> the member that should hold it (`preferred`)."""
    names = sorted(members)
    if not names:
        return {}
    cap = -(-shards // len(names))
    load = dict.fromkeys(names, 0)
    out = {}
    for k in range(shards):
        for name in sorted(names, key=lambda n: (_h(f"{k}\0{n}"), n), reverse=True):
            if load[name] < cap:
                out[k], load[name] = name, load[name] + 1
                break
    return out


@dataclass(frozen=True)
class ShardMove:
    action: str  # "campaign" | "resign" | "hold" | "wait" | "follow"
    reason: str


def move(
    shard: int,
    shards: int,
    me: str,
    members: Mapping[str, float],
    holder: str,
    vacant_since: float | None,
    now: float,
    settle: float = DEFAULT_SETTLE_SECONDS,
) -> ShardMove:
    """What this replica does about `shard` now.

    `members`: the live replicas (membership keys in the store) and since when this replica has seen each;
    `holder`: who holds the shard's leader key ("" nobody; `me` when this replica's term is in force);
    `vacant_since`: since when this replica has seen the shard without a holder (None: held)."""
    # A shard is handed only to a member seen for `settle` seconds (see DEFAULT_SETTLE_SECONDS).
    settled = {name: since for name, since in members.items() if now - since >= settle}
    if holder == me:
        # Handed over only when the ring over every member agrees that it is not ours: were the two rings
        # to differ, a replica would resign a shard the ring over every member then gives it back.
        best = preferred(shard, shards, {**settled, me: 0.0})
        if best != me and preferred(shard, shards, {**members, me: 0.0}) != me:
            return ShardMove("resign", f"handing shard {shard} to {best}, the ring's choice")
        return ShardMove("hold", f"shard {shard}: held, the ring's choice")
    if holder:
        return ShardMove("follow", f"shard {shard}: held by {holder}")
    if me not in members:
        return ShardMove("wait", f"shard {shard}: vacant, this replica not yet a member in the store")
    # Every member counts here, settled or not: a vacant shard is better held by a newcomer than by nobody.
    best = preferred(shard, shards, members)
    if best == me:
        return ShardMove("campaign", f"shard {shard}: vacant, this replica the ring's choice")
    vacant = now - vacant_since if vacant_since is not None else 0.0
    if vacant >= settle:
        return ShardMove("campaign", f"shard {shard}: vacant for {vacant:.1f} s, {best} has not taken it")
    return ShardMove("wait", f"shard {shard}: vacant, left to {best} (the ring's choice)")
