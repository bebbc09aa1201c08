"""One controller replica's membership in the cluster: the electors (who leads each shard of the services,
`shards.py`), the service records and the shared journal in etcd, and the rule every acting part asks first:
`not_leading(service)`, "" only while this replica leads the service's shard *and* has read the shared state
since that term began (a new leader never acts on a copy that predates its predecessor's last writes).

With one shard (the default) this is Patroni's model: one leader acts for every service. With more, each
replica has a membership key on its own lease, campaigns for the vacant shards the ring gives it and hands
over those the ring gives to a replica that joined: capacity grows with replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from controller.cluster.shards import ShardMove, assignment, move, shard_of
from controller.config import ClusterConfig, ControllerConfig
from controller.status import ClusterView

log = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_INTERVAL_SECONDS = 0.5  # records and journal read from etcd: what a follower's views lag by at most
PRUNE_INTERVAL_SECONDS = 600.0
HANDOVER_DRAIN_SECONDS = 5.0  # at most this long between stopping acting for a shard and revoking it


class Replica:
    def __init__(self, cfg: ControllerConfig, store: JournaledStore) -> None:
        assert cfg.cluster is not None
        c: ClusterConfig = cfg.cluster
        ca, cert, key = cfg.cluster_tls()
        tls = EtcdTls(str(ca), str(cert or ""), str(key or "")) if ca is not None else None
        self.cfg, self.name = c, c.name
        self.dcs = EtcdDcs(c.etcd, tls, timeout=c.request_timeout_seconds)
        self.shards = c.shards
        keys = (
            [c.prefix + "/leader"]
            if c.shards == 1
            else [f"{c.prefix}/shards/{k}/leader" for k in range(c.shards)]
        )
        self.electors = [
            Elector(self.dcs, c.name, c.ttl_seconds, key=key, wants=functools.partial(self._wants, k))
            for k, key in enumerate(keys)
        ]
        self.elector = self.electors[0]  # shard 0's leader also keeps the journal's retention
        # Shards: this replica's membership key, on a lease of its own (an elector whose key no other
        # replica creates); a replica that dies is no longer a member one TTL later.
        self.membership = (
            Elector(self.dcs, c.name, c.ttl_seconds, key=f"{c.prefix}/members/{c.name}")
            if c.shards > 1
            else None
        )
        self.members: dict[str, float] = {}  # live replicas -> since when this one has seen each
        self._heirs: dict[int, str] = {}  # shard -> who takes it should its holder go (the ring without it)
        self.holders: dict[int, str] = {}  # shard -> its leader key's holder, as last read
        self._vacant: dict[int, float] = {}  # shard -> since when seen without a holder
        self._said: dict[int, str] = {}  # shard -> the last move logged
        self._shard_of: dict[str, int] = {}
        self._handing: set[int] = set()  # shards being handed over: held, not acted for
        # Whether a transition of one of the shard's services is under way (the server sets it)
        self.in_flight: Callable[[int], bool] = lambda shard: False
        self.records = EtcdRecords(self.dcs, c.prefix)
        self.journal = Journal(self.dcs, c.prefix, c.name, store)
        self._ready: dict[
            int, tuple[int, float]
        ] = {}  # shard -> (the term whose shared state was read, when)
        # Sharded: a replica that takes a shard over waits this long before acting, so that the shard's agents
        # (told to send it heartbeats and views again: FailoverLoop.interest) have been heard, or are silent
        self.hear_seconds = cfg.failover.heartbeat_timeout_seconds if c.shards > 1 else 0.0
        self.synced = True  # the last read of records and journal succeeded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cluster-sync")
        self._tasks: list[asyncio.Task[None]] = []

    def shard_of(self, service: str) -> int:
        k = self._shard_of.get(service)
        if k is None:  # asked for every service on every HA tick: hashed once
            k = self._shard_of[service] = shard_of(service, self.shards)
        return k

    def not_leading_shard(self, shard: int) -> str:
        e = self.electors[shard]
        s = e.standing()
        what = f"shard {shard}: " if self.shards > 1 else ""
        if not s.acting:
            return what + s.reason
        if shard in self._handing:
            return what + "handing over to the ring's choice"
        ready = self._ready.get(shard)
        if e.term is None or ready is None or e.term.lease != ready[0]:
            return what + "elected, reading the shared state before acting"
        if self.hear_seconds and (left := ready[1] + self.hear_seconds - time.monotonic()) > 0:
            return what + f"taken over, hearing its agents for {left:.1f} s more before acting"
        return ""

    def not_leading(self, service: str) -> str:
        """Why this replica may not act for `service` now ("" while it may)."""
        return self.not_leading_shard(self.shard_of(service))

    def tracks(self, service: str) -> bool:
        """Whether this replica follows `service` closely (its primary's health over time): with one shard
        every replica may lead any service next; with more, only a service of a shard held here."""
        return self.shards == 1 or self.electors[self.shard_of(service)].term is not None

    def hears(self, service: str) -> bool:
        """Whether this replica keeps `service`'s hosts' telemetry: while it tracks the service, and while it
        is next in line for its shard (the ring's choice were the holder gone), so that a replica taking a
        dead one's shard forecasts from the history it had; and while the shard has no holder."""
        if self.tracks(service):
            return True
        k = self.shard_of(service)
        heir = self._heirs.get(k)
        return not self.holders.get(k) or heir is None or heir == self.name

    def _holder(self, shard: int) -> str:
        return self.name if self.electors[shard].term is not None else self.holders.get(shard, "")

    def _move(self, shard: int) -> ShardMove:
        return move(
            shard,
            self.shards,
            self.name,
            self.members,
            self._holder(shard),
            self._vacant.get(shard),
            time.monotonic(),
        )

    def _note(self, shard: int, m: ShardMove) -> None:
        if m.action != self._said.get(shard):
            self._said[shard] = m.action
            log.info("%s: %s", self.name, m.reason)

    def _wants(self, shard: int) -> bool:
        """Asked by a shard's elector before it campaigns."""
        if self.shards == 1:
            return True
        m = self._move(shard)
        self._note(shard, m)
        return m.action == "campaign"

    async def _rebalance(self) -> None:
        """Hand over the shards the ring gives to another member: stop acting (the elector's term is gone at
        once), then revoke the lease, which deletes the key for the ring's choice."""
        for k, e in enumerate(self.electors):
            if e.term is None:
                continue
            m = self._move(k)
            self._note(k, m)
            if m.action == "resign":
                await self._hand_over(k, e)

    async def _hand_over(self, shard: int, e: Elector) -> None:
        """Stop acting for the shard while still holding its key (no other replica can start), let what
        was under way end: its transitions stop at their next step, this replica's journal entries reach
        etcd (the taker restores its scaling from them); then revoke, at most HANDOVER_DRAIN_SECONDS later."""
        self._handing.add(shard)
        try:
            deadline = time.monotonic() + HANDOVER_DRAIN_SECONDS
            while time.monotonic() < deadline and (self.journal.pending or self.in_flight(shard)):
                await asyncio.sleep(0.05)
            await e.resign()
        finally:
            self._handing.discard(shard)

    def _read_shards(self) -> tuple[list[str], dict[int, str]]:
        prefix = self.cfg.prefix
        members = [key.rsplit("/", 1)[1] for key, _ in self.dcs.scan(prefix + "/members/")]
        holders = {}
        for key, v in self.dcs.scan(prefix + "/shards/"):
            k, _, what = key[len(prefix + "/shards/") :].partition("/")
            if what == "leader" and k.isdigit() and int(k) < self.shards:
                holders[int(k)] = v.value.decode(errors="replace")
        return members, holders

    def _learn_shards(self, members: list[str], holders: dict[int, str]) -> None:
        now = time.monotonic()
        self.members = {name: self.members.get(name, now) for name in members}
        self.holders = holders
        without = {h: assignment(self.shards, [m for m in members if m != h]) for h in set(holders.values())}
        self._heirs = {k: without[h].get(k, "") for k, h in holders.items()}
        for k, e in enumerate(self.electors):
            if e.term is None:
                e.leader = holders.get(k, "")
            if e.term is None and k not in holders:
                self._vacant.setdefault(k, now)
            else:
                self._vacant.pop(k, None)

    def view(self) -> ClusterView:
        reachable = self.elector.store_reachable and self.synced
        acting = [k for k in range(self.shards) if not self.not_leading_shard(k)]
        if self.shards == 1:
            why = self.not_leading_shard(0)
            state = why or "leader"
        else:
            why = "" if acting else f"leads no shard ({len(self.members)} members)"
            held = ", ".join(map(str, acting))
            state = f"leader of {len(acting)} of {self.shards} shards ({held})" if acting else why
        if not reachable and why:
            state = f"etcd unreachable: no failovers or scaling from this replica (fail-static); {why}"
        return ClusterView(
            self.name,
            bool(acting),
            self.elector.leader,
            reachable,
            state,
            self.journal.pending,
            shards=self.shards,
            shards_acting=len(acting),
        )

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def sync(self) -> None:
        """Read the records and the journal (and, with shards, the members and holders) once; each term in
        force when it began is then ready."""
        terms = {k: e.term.lease for k, e in enumerate(self.electors) if e.term is not None}
        try:
            await self.records.refresh()
            n = await self.journal.catch_up(self._run)
            if self.shards > 1:
                self._learn_shards(*await self._run(self._read_shards))
        except DcsUnavailable as e:
            if self.synced:
                log.warning("%s: cannot read the shared state: %s", self.name, e)
            self.synced = False
            return
        if n:
            log.debug("%s: imported %d journal entries", self.name, n)
        self.synced = True
        for k, lease in terms.items():
            term = self.electors[k].term
            if term is not None and term.lease == lease and self._ready.get(k, (0, 0.0))[0] != lease:
                of = (
                    f" of shard {k} once its agents have been heard for {self.hear_seconds:g} s"
                    if self.shards > 1
                    else ""
                )
                log.info("%s: shared state read; acting as leader%s", self.name, of)
                self._ready[k] = (lease, time.monotonic())
        if self.shards > 1:
            await self._rebalance()

    def _leases(self) -> tuple[int | None, ...]:
        return tuple(e.term.lease if e.term else None for e in self.electors)

    async def _sync_forever(self) -> None:
        leases = self._leases()
        while True:
            try:
                await self.sync()
            except Exception:  # an answer the client did not expect: logged, tried again
                log.exception("%s: reading the shared state failed", self.name)
                self.synced = False
            # a fresh term is read at once, not half an interval later
            for _ in range(int(SYNC_INTERVAL_SECONDS / 0.05)):
                if self._leases() != leases:
                    break
                await asyncio.sleep(0.05)
            leases = self._leases()

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
            if not self.not_leading_shard(0):
                try:
                    await self._run(self.journal.prune)
                except Exception as e:  # retried at the next round
                    log.warning("%s: journal retention skipped: %s", self.name, e)

    def start(self) -> None:
        electors = [*self.electors, *([self.membership] if self.membership else [])]
        self._tasks = [
            *(asyncio.create_task(e.run()) for e in electors),
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
        electors = [*self.electors, *([self.membership] if self.membership else [])]
        await asyncio.gather(*(e.resign() for e in electors))
        self.journal.close()
        self.records.close()
        for e in electors:
            e.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
