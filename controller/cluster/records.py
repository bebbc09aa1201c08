"""Service records in etcd (`controller/failover/records.py` has the interface): one key per service,
changed only by compare-and-set on the revision this replica last read.

Every replica keeps a copy of all records, refreshed from etcd in the background, so the HA loop reads
without waiting on the network. A save compares against the copy's revision: if another replica wrote the
record since (it leads now), the save fails and the copy is refreshed; the caller's transition stops there.
Fencing tokens are the records' tokens: each placement writes token + 1 over the record it read, so no two
leaders ever hand out the same token, and tokens grow across leaders and restarts of everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from controller.cluster.dcs import Dcs, DcsUnavailable
from controller.failover.records import RecordConflict
from controller.store import ServiceRecord

log = logging.getLogger(__name__)


def encode(rec: ServiceRecord) -> bytes:
    return json.dumps(asdict(rec), sort_keys=True).encode()


def decode(raw: bytes) -> ServiceRecord:
    return ServiceRecord(**json.loads(raw))


class EtcdRecords:
    def __init__(self, dcs: Dcs, prefix: str) -> None:
        self.dcs, self.prefix = dcs, prefix + "/services/"
        self._copy: dict[str, tuple[ServiceRecord, int]] = {}  # name -> (record, revision)
        self._read_up_to = 0  # the newest revision a read of etcd returned: the next read starts after it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="records")

    def get(self, name: str) -> ServiceRecord:
        have = self._copy.get(name)
        return have[0] if have is not None else ServiceRecord(name)

    def revision(self, name: str) -> int:
        have = self._copy.get(name)
        return have[1] if have is not None else 0

    async def save(self, rec: ServiceRecord) -> ServiceRecord:
        rev = self.revision(rec.name)
        loop = asyncio.get_running_loop()
        try:
            new_rev = await loop.run_in_executor(
                self._pool, lambda: self.dcs.cas(self.prefix + rec.name, encode(rec), rev)
            )
        except DcsUnavailable as e:
            raise RecordConflict(f"service {rec.name}: record not saved, etcd unreachable: {e}") from None
        if not new_rev:
            await self.refresh()
            raise RecordConflict(
                f"service {rec.name}: record changed by another replica since revision {rev} "
                f"(now token {self.get(rec.name).token}); this replica no longer leads it"
            )
        self._copy[rec.name] = (rec, new_rev)
        return rec

    def _read_since(self, since: int) -> dict[str, tuple[ServiceRecord, int]]:
        out = {}
        for key, v in self.dcs.scan(self.prefix, min_revision=since):
            name = key[len(self.prefix) :]
            try:
                out[name] = (decode(v.value), v.revision)
            except (ValueError, TypeError) as e:  # written by a newer or broken replica: say so, keep going
                log.error("etcd key %s: not a service record (%s); left as it is", key, e)
        return out

    async def refresh(self) -> None:
        """Read the records changed in etcd since the last read (raises DcsUnavailable). A record is
        replaced only by a newer one."""
        # Only what changed since the newest revision a read returned: at hundreds of services, a read of
        # every record every sync interval was a tenth of a replica's time (records are never deleted).
        # Not since this replica's own saves: another replica's write may have a lower revision, unread.
        since = self._read_up_to + 1 if self._read_up_to else 0
        fresh = await asyncio.get_running_loop().run_in_executor(self._pool, lambda: self._read_since(since))
        self._read_up_to = max([self._read_up_to, *(rev for _, rev in fresh.values())])
        for name, (rec, rev) in fresh.items():
            if rev >= self.revision(name):
                self._copy[name] = (rec, rev)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
