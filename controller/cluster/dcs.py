"""The distributed configuration store (DCS) the controller replicas share, behind one small interface (as
Patroni keeps its DCS): keys with revisions, compare-and-set for every shared change, and leases whose
expiry deletes the keys attached to them. `controller/cluster/etcd.py` implements it over etcd.

Blocking calls: a replica makes them from a worker thread, never on the event loop that answers renewals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class DcsUnavailable(RuntimeError):
    """No member of the store answered in time: nothing is known, nothing was changed for sure."""


@dataclass(frozen=True)
class Versioned:
    value: bytes
    revision: int  # the store's revision of the key's last change: what a compare-and-set compares


class Dcs(Protocol):
    def grant(self, ttl_seconds: int) -> int:
        """A new lease of `ttl_seconds`: the id. The store deletes the keys attached to it when it expires."""
        ...

    def keepalive(self, lease: int) -> bool:
        """Renew the lease for its whole TTL; False if it had already expired (its keys are gone)."""
        ...

    def revoke(self, lease: int) -> None:
        """End the lease now (its keys are deleted at once): a clean step-down."""
        ...

    def get(self, key: str) -> Versioned | None:
        """The key's value and revision, read from the store's quorum (never a stale member)."""
        ...

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put `value` only if the key does not exist (attached to `lease` if given). True if it did not."""
        ...

    def cas(self, key: str, value: bytes, revision: int) -> int:
        """Put `value` only if the key's revision is still `revision` (0: the key must not exist). The key's
        new revision, or 0 if another writer changed it first (nothing was written)."""
        ...

    def put(self, key: str, value: bytes) -> int:
        """Put `value` unconditionally (a key only this replica writes); the key's new revision."""
        ...

    def scan(self, prefix: str, min_revision: int = 0, limit: int = 0) -> list[tuple[str, Versioned]]:
        """The keys under `prefix` last changed at `min_revision` or later, oldest change first, at most
        `limit` of them (0: all)."""
        ...

    def delete_below(self, prefix: str, end: str) -> None:
        """Delete the keys under `prefix` that sort before `prefix + end` (retention of a time-keyed log)."""
        ...


def increment(dcs: Dcs, key: str, attempts: int = 100) -> int:
    """Add one to the counter at `key` by compare-and-set: the new value, which no other replica gets. Fencing
    tokens come from here, so they grow across leaders and across restarts of everything."""
    for _ in range(attempts):
        cur = dcs.get(key)
        value = int(cur.value) + 1 if cur is not None else 1
        if dcs.cas(key, str(value).encode(), cur.revision if cur is not None else 0):
            return value
    raise DcsUnavailable(f"{key}: {attempts} compare-and-set attempts lost to other writers")
