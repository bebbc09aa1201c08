"""The replicas' shared history: events, scaling decisions and operator overrides, appended to one log in
etcd and copied into every replica's own SQLite store, so `shadowctl events`, the plan and the overrides
read the same on every replica, and a new leader's scaling loop restores from the decisions the old leader
made (`ScalingLoop.restore`), as after a restart.

- Writing: `JournaledStore` is the SQLite store with its three shared writes also queued for etcd. One
  thread puts the queue in order (a replica's entries keep their order), retrying while etcd is away: an
  entry is never dropped; it waits in memory.
- Reading: every replica tails the log by etcd revision (the log's one order) and imports the entries other
  replicas wrote, together with the revision read, so an import is never repeated after a restart.
- Retention: the leader deletes entries older than a day (keys start with their time); each replica keeps
  its own copy for `store.retention_hours`. A replica away for longer than a day misses the older ones.

Telemetry is not in here: agents stream it to every replica (docs/cluster.md says why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.cluster.dcs import Dcs, DcsUnavailable
from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.store import EventRecord, SqliteStore

log = logging.getLogger(__name__)

RETENTION_SECONDS = 24 * 3600
SNAPSHOT_SECONDS = 600.0  # an unchanged decision is shared this often (a new leader's calibration)
DECISIONS_PER_ENTRY = 100  # ~60 KB: far under etcd's default request limit of 1.5 MiB
MAX_ENTRY_BYTES = 1 << 20  # under that limit, with room for the key and base64 (the gateway's JSON)
REFUSALS_BEFORE_DROP = 8  # about 10 s of retries (etcd also says "too many requests" when busy)
TAIL_BATCH = 500
POSITION_KEY = "cluster_journal_revision"


class JournaledStore(SqliteStore):
    """The SQLite store whose shared writes (events, decisions, overrides) are also published."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.publish: Callable[[str, dict[str, Any]], None] = lambda kind, body: None
        # Called with each imported event: the event log's live watchers and counters hear it too.
        self.on_imported_event: Callable[[EventRecord], None] = lambda ev: None
        # (host, workload, resource) -> (what the last shared decision said, when): see add_decisions
        self._shared: dict[tuple[str, str, str], tuple[tuple[object, ...], float]] = {}

    def add_event(self, ev: EventRecord) -> EventRecord:
        out = super().add_event(ev)
        self.publish("event", dataclasses.asdict(dataclasses.replace(out, id=0)))
        return out

    def add_decisions(self, decisions: list[ScalingDecision]) -> list[ScalingDecision]:
        """Stored here in full; shared when they change something (the limit, the result, the branch) and
        otherwise once per SNAPSHOT_SECONDS per shadow resource: a cycle every 10 s for every shadow of a
        fleet would be gigabytes a day in etcd, which is sized for metadata. A new leader restores from the
        latest shared one (`ScalingLoop.restore`): its calibration at most that old. In entries of at most
        DECISIONS_PER_ENTRY, well under etcd's request limit (1.5 MiB by default)."""
        out = super().add_decisions(decisions)
        now = time.monotonic()
        shared = []
        for d in out:
            key, sig = (d.host, d.workload, d.resource), (d.new, d.result, d.branch, d.clamps)
            last = self._shared.get(key)
            if last is None or last[0] != sig or now - last[1] >= SNAPSHOT_SECONDS:
                self._shared[key] = (sig, now)
                shared.append(dataclasses.asdict(dataclasses.replace(d, id=0)))
        for i in range(0, len(shared), DECISIONS_PER_ENTRY):
            self.publish("decisions", {"list": shared[i : i + DECISIONS_PER_ENTRY]})
        return out

    def set_override(self, o: Override) -> None:
        super().set_override(o)
        self.publish("override", dataclasses.asdict(o))

    # ---- imports: the same rows, not published again ----

    def journal_revision(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (POSITION_KEY,)).fetchone()
        return int(row[0]) if row else 0

    def import_entries(self, entries: list[tuple[str, dict[str, Any]]], revision: int) -> list[EventRecord]:
        """Store other replicas' entries and the log position after them, in one transaction."""
        events = []
        with self._tx():
            for kind, body in entries:
                try:
                    if kind == "event":
                        events.append(super().add_event(EventRecord(**body)))
                    elif kind == "decisions":
                        super().add_decisions([ScalingDecision(**d) for d in body["list"]])
                    elif kind == "override":
                        super().set_override(Override(**body))
                    else:  # a newer replica's kind
                        log.warning("journal: entry of unknown kind %r skipped", kind)
                except (TypeError, KeyError, ValueError) as e:
                    # written by a newer or broken replica: skipped and said; the rest is imported
                    log.error("journal: %s entry skipped, not readable by this version: %s", kind, e)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (POSITION_KEY, str(revision)))
        return events


class Journal:
    def __init__(self, dcs: Dcs, prefix: str, name: str, store: JournaledStore) -> None:
        self.dcs, self.name, self.store = dcs, name, store
        self.prefix = prefix + "/journal/"
        self._seq = itertools.count(1)
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pending = 0  # entries not yet in etcd (status)
        self.dropped = 0  # entries etcd refused for good
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_forever, name="journal", daemon=True)
        self._writer.start()
        store.publish = self.publish
        self.last_error = ""

    def publish(self, kind: str, body: dict[str, Any]) -> None:
        key = f"{self.prefix}{int(time.time() * 1000):013d}-{self.name}-{next(self._seq):09d}"
        value = json.dumps({"kind": kind, "origin": self.name, "body": body}).encode()
        if len(value) > MAX_ENTRY_BYTES:  # etcd would refuse it: said and kept here only
            self.dropped += 1
            self.last_error = f"{key}: {kind} entry of {len(value)} bytes, over {MAX_ENTRY_BYTES}"
            log.error("journal: %s; kept in this replica's store only", self.last_error)
            return
        self.pending += 1
        self._queue.put((key, value))

    def _write_forever(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                key, value = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            refused = 0
            while not self._stop.is_set():
                try:
                    self.dcs.put(key, value)
                    self.pending -= 1
                    delay = 0.1
                    break
                except DcsUnavailable as e:  # kept, in order, until etcd is back
                    self.last_error = str(e)
                    self._stop.wait(delay)
                    delay = min(2 * delay, 2.0)
                except Exception as e:  # refused ("too many requests" is also how etcd says too large)
                    self.last_error = f"{key}: {type(e).__name__}: {e}"
                    refused += 1
                    if refused < REFUSALS_BEFORE_DROP:
                        self._stop.wait(delay)
                        delay = min(2 * delay, 2.0)
                        continue
                    # refused for good (not allowed, or a bug): said, dropped, the journal goes on
                    log.error("journal: etcd refused %s, dropped (kept in this replica's store): %s", key, e)
                    self.pending -= 1
                    self.dropped += 1
                    break

    def read_after(self, revision: int) -> tuple[list[tuple[str, dict[str, Any]]], int]:
        """(entries other replicas wrote, the revision read up to) after `revision`: blocking."""
        entries: list[tuple[str, dict[str, Any]]] = []
        got = self.dcs.scan(self.prefix, min_revision=revision + 1, limit=TAIL_BATCH)
        for key, v in got:
            revision = max(revision, v.revision)
            try:
                e = json.loads(v.value)
                if e["origin"] != self.name:
                    entries.append((str(e["kind"]), dict(e["body"])))
            except (ValueError, KeyError, TypeError) as err:
                log.error("journal: %s is not an entry (%s); skipped", key, err)
        return entries, revision

    async def catch_up(self, run: Callable[[Callable[[], Any]], Any]) -> int:
        """Import everything new (several batches if needed); how many entries. `run` runs a blocking call
        off the loop."""
        total = 0
        while True:
            start = self.store.journal_revision()
            entries, rev = await run(functools.partial(self.read_after, start))
            if rev == start:
                return total
            for ev in self.store.import_entries(entries, rev):
                self.store.on_imported_event(ev)
            total += len(entries)

    def prune(self, now_s: float | None = None) -> None:
        """Delete entries older than the retention (the leader does, now and then): blocking."""
        cutoff = int(((now_s or time.time()) - RETENTION_SECONDS) * 1000)
        self.dcs.delete_below(self.prefix, f"{cutoff:013d}")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._writer.join(timeout=1.0)
