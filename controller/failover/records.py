"""Where each service's ownership record (owner, phase, candidate, fencing token) is kept, behind one small
interface: the single controller keeps it in its SQLite store; replicas keep it in etcd, changed only by
compare-and-set (`controller/cluster/records.py`).

Reads never block (the HA loop reads every service on every tick); a save may wait on the network, so it
is awaited, and it fails with `RecordConflict` when another writer changed the record since it was read:
a replica that lost leadership mid-transition never overwrites its successor's record.
"""

from __future__ import annotations

from typing import Protocol

from controller.store import ServiceRecord, Store


class RecordConflict(RuntimeError):
    """The record changed since it was read (another leader wrote it), or the store could not say."""


class ServiceRecords(Protocol):
    def get(self, name: str) -> ServiceRecord:
        """The record as last known (a service never decided has no owner yet)."""
        ...

    async def save(self, rec: ServiceRecord) -> ServiceRecord:
        """Write `rec` over the version `get` returned; RecordConflict if that is no longer the latest."""
        ...


class LocalRecords:
    """The single controller's records: its own SQLite store, which no one else writes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Read once from the store, then kept here: the HA loop reads every service several times a tick,
        # and only this controller writes them.
        self._copy: dict[str, ServiceRecord] = {}

    def get(self, name: str) -> ServiceRecord:
        rec = self._copy.get(name)
        if rec is None:
            rec = self._copy[name] = self.store.service_state(name) or ServiceRecord(name)
        return rec

    async def save(self, rec: ServiceRecord) -> ServiceRecord:
        self.store.save_service_state(rec)  # a local row: microseconds, on the loop as before
        self._copy[rec.name] = rec
        return rec
