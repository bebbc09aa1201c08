"""Every decision and transition, recorded with its reason, and streamed to whoever watches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controller.store import EventRecord, Store

log = logging.getLogger("shadowplane.events")


class EventLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._subscribers: set[asyncio.Queue[EventRecord]] = set()
        self.listeners: list[Callable[[EventRecord], None]] = []  # called in-line, e.g. metrics counters

    def record(self, kind: str, service: str, host: str, reason: str, **detail: object) -> EventRecord:
        ev = self.store.add_event(
            EventRecord(
                kind, service, host, reason, int(time.time() * 1000), {k: str(v) for k, v in detail.items()}
            )
        )
        log.info(
            "[%s] %s%s: %s%s",
            kind,
            service,
            f" @{host}" if host else "",
            reason,
            "".join(f" {k}={v}" for k, v in ev.detail.items()),
        )
        self.deliver(ev)
        return ev

    def deliver(self, ev: EventRecord) -> None:
        """To the counters and live watchers: each recorded event, and each one another replica recorded
        (`controller/cluster/journal.py` imports them)."""
        for listener in self.listeners:
            listener(ev)
        for q in list(self._subscribers):
            if q.full():
                q.get_nowait()  # a slow watcher loses its oldest events, never blocks the controller
            q.put_nowait(ev)

    def subscribe(self) -> asyncio.Queue[EventRecord]:
        q: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize=10_000)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[EventRecord]) -> None:
        self._subscribers.discard(q)
