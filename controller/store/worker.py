"""The store's work that may take long, run off the event loop: one thread, its own connection.

The controller's event loop also answers lease renewals every 0.25 s and runs the HA loop, so it must never
wait for thousands of rows. Queries and deletes that can be large (retention pruning, a 10,000-row
`GetTelemetry`, a day of series for the challenger's backtest) run here instead:

- one thread, so the worker's own connection is only ever used by it (SQLite connections are not for
  concurrent use, and Python's `sqlite3` does not lock one for you);
- its own connection to the same file: in WAL mode readers never block the loop's writes nor wait for
  them, and each read sees only committed data (the loop writes in autocommit or short transactions);
- writes stay serialized by SQLite's one write lock: the worker's only write, pruning, deletes in small
  chunks, one short transaction each with a pause between them (`SqliteStore.prune`), so a write from the
  loop waits at most about one chunk (its connection's busy timeout covers that), never the whole prune.

A store that cannot be opened twice (`:memory:`) is shared with the loop instead: tests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from controller.store.base import Store

T = TypeVar("T")

# The worker thread runs below the event loop's priority (Linux nice applies per thread): on a busy host the
# loop's thread gets the CPU first.
WORKER_NICENESS = 10


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the worker runs at the loop's priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


class StoreWorker:
    def __init__(self, store: Store) -> None:
        self._main = store
        self._own: Store | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="store-worker", initializer=_lower_priority
        )

    async def run(self, fn: Callable[[Store], T]) -> T:
        """`fn(store)` in the worker thread, on the worker's connection; its result, or its exception."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[Store], T]) -> T:
        if self._own is None:
            self._own = self._main.another_connection()  # opened in the thread that will use it
        return fn(self._own)

    def close(self) -> None:
        """Wait for the running job, then close the worker's connection (not the loop's)."""
        self._pool.submit(self._close_own)
        self._pool.shutdown(wait=True)

    def _close_own(self) -> None:
        if self._own is not None and self._own is not self._main:
            with contextlib.suppress(Exception):
                self._own.close()
        self._own = None
