"""One replica's campaign for leadership (`leadership.py` has the rules): grant a DCS lease, create the
leader key on it if no replica holds it, renew it every third of its TTL, step down when the rules say so.
Each change of standing is logged with its reason.

The store's calls block: they run in a thread of their own, so an unreachable etcd never stalls the event
loop. `acts()` applies the rules at the moment it is asked, so a leader whose renewals are stuck stops
acting on time even while its campaign task is waiting for the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from controller.cluster.dcs import Dcs, DcsUnavailable
from controller.cluster.leadership import DEFAULT_MARGIN, DEFAULT_TTL_SECONDS, Standing, Term, standing

log = logging.getLogger(__name__)

T = TypeVar("T")

LEADER_KEY = "/shadowplane/leader"


class Elector:
    def __init__(
        self,
        dcs: Dcs,
        name: str,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        margin: float = DEFAULT_MARGIN,
        key: str = LEADER_KEY,
        clock: Callable[[], float] = time.monotonic,
        wants: Callable[[], bool] = lambda: True,
    ) -> None:
        self.dcs, self.name, self.ttl, self.margin = dcs, name, ttl_seconds, margin
        self.key, self.clock = key, clock
        # Whether to campaign when not holding the key (a shard's elector asks the ring: shards.py)
        self.wants = wants
        self.campaigning = True  # what wants() said last
        self.term: Term | None = None
        self.leader = ""  # who the key names, as last read ("" unknown or none)
        self.store_reachable = True
        self._said = ""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dcs")

    def standing(self) -> Standing:
        return standing(self.term, self.clock(), self.leader, self.margin, self.campaigning)

    def acts(self) -> bool:
        """May this replica act as leader at this moment?"""
        return self.standing().acting

    async def _store(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def step(self) -> None:
        """One round: campaign, or renew the term; then apply the rules."""
        try:
            if self.term is None:
                self.campaigning = self.wants()
                if self.campaigning:
                    await self._campaign()
            else:
                term, sent = self.term, self.clock()
                if await self._store(lambda: self.dcs.keepalive(term.lease)):
                    if self.term is term:  # not resigned while the renewal was out (a shard handed over)
                        self.term = replace(term, confirmed_sent_at=sent)
                elif self.term is term:
                    self._note("lost leadership: the store expired the lease")
                    self.term, self.leader = None, ""
            self.store_reachable = True
        except DcsUnavailable as e:
            if self.store_reachable:
                log.warning("%s: %s", self.name, e)
            self.store_reachable = False
        s = self.standing()
        if self.term is not None and not s.acting:
            # Ran out without a confirmed renewal: the store may expire the key any moment, if it has not.
            # A fresh campaign starts from a fresh lease (the old one is revoked if the store hears us).
            old, self.term, self.leader = self.term, None, ""
            self._note(f"stepped down: {s.reason}")
            with contextlib.suppress(DcsUnavailable):
                await self._store(lambda: self.dcs.revoke(old.lease))
        self._note(self.standing().reason)

    async def _campaign(self) -> None:
        sent = self.clock()
        lease = await self._store(lambda: self.dcs.grant(self.ttl))
        if await self._store(lambda: self.dcs.create(self.key, self.name.encode(), lease)):
            self.term, self.leader = Term(lease, float(self.ttl), sent), self.name
            return
        await self._store(lambda: self.dcs.revoke(lease))
        held = await self._store(lambda: self.dcs.get(self.key))
        self.leader = held.value.decode(errors="replace") if held is not None else ""

    def _note(self, reason: str) -> None:
        # the standing's reason without its countdown: logged once per change
        key = reason.split(" (lease")[0]
        if key != self._said:
            self._said = key
            log.info("%s: %s", self.name, reason)

    async def run(self) -> None:
        interval = self.ttl / 3
        while True:
            t0 = self.clock()
            try:
                await self.step()
            except Exception:  # an answer the client did not expect: logged; acts() still bounds the term
                log.exception("%s: campaign round failed", self.name)
                self.store_reachable = False
            await asyncio.sleep(max(0.0, interval - (self.clock() - t0)))

    async def resign(self) -> None:
        """Step down at once (a clean stop): revoke the lease, which deletes the key for the next leader."""
        term, self.term, self.leader = self.term, None, ""
        if term is not None:
            self._note("resigned")
            with contextlib.suppress(DcsUnavailable):
                await self._store(lambda: self.dcs.revoke(term.lease))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
