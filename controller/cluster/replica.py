"""One controller replica's membership in the cluster: the elector (who leads), the service records and the
shared journal in etcd, and the rule every acting part asks first: `not_leading()`, "" only while this
replica leads *and* has read the shared state since its term began (a new leader never acts on a copy that
predates its predecessor's last writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from controller.cluster.dcs import DcsUnavailable
from controller.cluster.elector import Elector
from controller.cluster.etcd import EtcdDcs, EtcdTls
from controller.cluster.journal import Journal, JournaledStore
from controller.cluster.records import EtcdRecords
from controller.config import ClusterConfig, ControllerConfig
from controller.status import ClusterView

log = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_INTERVAL_SECONDS = 0.5  # records and journal read from etcd: what a follower's views lag by at most
PRUNE_INTERVAL_SECONDS = 600.0


class Replica:
    def __init__(self, cfg: ControllerConfig, store: JournaledStore) -> None:
        assert cfg.cluster is not None
        c: ClusterConfig = cfg.cluster
        ca, cert, key = cfg.cluster_tls()
        tls = EtcdTls(str(ca), str(cert or ""), str(key or "")) if ca is not None else None
        self.cfg, self.name = c, c.name
        self.dcs = EtcdDcs(c.etcd, tls, timeout=c.request_timeout_seconds)
        self.elector = Elector(self.dcs, c.name, c.ttl_seconds, key=c.prefix + "/leader")
        self.records = EtcdRecords(self.dcs, c.prefix)
        self.journal = Journal(self.dcs, c.prefix, c.name, store)
        self._ready_lease: int | None = None  # the term whose shared state has been read
        self.synced = True  # the last read of records and journal succeeded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cluster-sync")
        self._tasks: list[asyncio.Task[None]] = []

    def not_leading(self) -> str:
        s = self.elector.standing()
        if not s.acting:
            return s.reason
        term = self.elector.term
        if term is None or term.lease != self._ready_lease:
            return "elected, reading the shared state before acting"
        return ""

    def view(self) -> ClusterView:
        why = self.not_leading()
        reachable = self.elector.store_reachable and self.synced
        if not why:
            state = "leader"
        elif not reachable:
            state = f"etcd unreachable: no failovers or scaling from this replica (fail-static); {why}"
        else:
            state = why
        return ClusterView(self.name, not why, self.elector.leader, reachable, state, self.journal.pending)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def sync(self) -> None:
        """Read the records and the journal once; the term in force when it began is then ready."""
        term = self.elector.term
        try:
            await self.records.refresh()
            n = await self.journal.catch_up(self._run)
        except DcsUnavailable as e:
            if self.synced:
                log.warning("%s: cannot read the shared state: %s", self.name, e)
            self.synced = False
            return
        if n:
            log.debug("%s: imported %d journal entries", self.name, n)
        self.synced = True
        if term is not None and self.elector.term is not None and self.elector.term.lease == term.lease:
            if self._ready_lease != term.lease:
                log.info("%s: shared state read; acting as leader", self.name)
            self._ready_lease = term.lease

    async def _sync_forever(self) -> None:
        lease: int | None = None
        while True:
            try:
                await self.sync()
            except Exception:  # an answer the client did not expect: logged, tried again
                log.exception("%s: reading the shared state failed", self.name)
                self.synced = False
            # a fresh term is read at once, not half an interval later
            for _ in range(int(SYNC_INTERVAL_SECONDS / 0.05)):
                term = self.elector.term
                if (term.lease if term else None) != lease:
                    break
                await asyncio.sleep(0.05)
            term = self.elector.term
            lease = term.lease if term else None

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
            if not self.not_leading():
                try:
                    await self._run(self.journal.prune)
                except Exception as e:  # retried at the next round
                    log.warning("%s: journal retention skipped: %s", self.name, e)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.elector.run()),
            asyncio.create_task(self._sync_forever()),
            asyncio.create_task(self._prune_forever()),
        ]

    async def stop(self) -> None:
        """A clean stop: resign (the next leader needs no TTL to pass), flush the journal briefly."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        deadline = time.monotonic() + 1.0
        while self.journal.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.elector.resign()
        self.journal.close()
        self.records.close()
        self.elector.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
