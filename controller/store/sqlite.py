"""SQLite store: one file, WAL. The event loop's connection does the writing; the store worker
(controller/store/worker.py) has a connection of its own for large reads and for pruning."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from controller import telemetry_schema as schema
from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.store.base import AgentRecord, EventRecord, ServiceRecord, StepAggregate
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import telemetry_pb2 as tpb

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    host TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    hello BLOB NOT NULL,
    peer TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    last_telemetry_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (host, instance_id)
);
CREATE TABLE IF NOT EXISTS samples (
    host TEXT NOT NULL,
    workload TEXT NOT NULL,
    end_ms INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    cgroup TEXT NOT NULL,
    -- the series the prediction engine reads, without decoding blobs (controller/telemetry_schema.py)
    {series_columns},
    sample BLOB NOT NULL,
    PRIMARY KEY (host, workload, end_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (end_ms);
-- Older history, compact: one row per workload per forecast step (`SqliteStore.compact` folds samples older
-- than [store] raw_hours in), each series combined as the schema says (mean or max) over `samples` rows.
-- About 80 bytes per row where a sample is about 800: what the forecaster and training read.
CREATE TABLE IF NOT EXISTS steps (
    host TEXT NOT NULL,
    workload TEXT NOT NULL,
    step_ms INTEGER NOT NULL,
    step INTEGER NOT NULL, -- samples ending in ((step - 1) * step_ms, step * step_ms]
    samples INTEGER NOT NULL,
    {step_columns},
    PRIMARY KEY (host, workload, step_ms, step)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS steps_by_end ON steps (step * step_ms); -- queries say it the same way
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS service_state (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    token INTEGER NOT NULL,
    phase TEXT NOT NULL,
    candidate TEXT NOT NULL,
    last_failover_ms INTEGER NOT NULL,
    last_transition_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unix_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    service TEXT NOT NULL,
    host TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_service ON events (service, id);
CREATE TABLE IF NOT EXISTS scaling_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unix_ms INTEGER NOT NULL,
    service TEXT NOT NULL,
    host TEXT NOT NULL,
    workload TEXT NOT NULL,
    resource TEXT NOT NULL,
    decision BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_key ON scaling_decisions (host, workload, resource, id);
CREATE TABLE IF NOT EXISTS scaling_overrides (
    host TEXT NOT NULL,
    workload TEXT NOT NULL,
    override BLOB NOT NULL,
    PRIMARY KEY (host, workload)
);
"""
SCHEMA = SCHEMA.format(series_columns=schema.sql_columns(), step_columns=schema.sql_columns(step=True))
SCHEMA_VERSION = "4"
# How each older version becomes this one, after the CREATE ... IF NOT EXISTS above (which is all "1" and "3"
# lack: version 3 had no step table).
UPGRADES: dict[str, Callable[[sqlite3.Connection], None]] = {
    "1": lambda db: None,
    "2": lambda db: _decisions_and_overrides_to_json(db),
    "3": lambda db: None,
}


# Pruning deletes this many samples per transaction, then pauses as long as the chunk took: the write lock
# is never held for long, and a write from the event loop (waiting in its busy timeout) gets its turn.
PRUNE_CHUNK_ROWS = 500
# Compaction folds about this many samples per transaction (then pauses as long as it took, as pruning does).
COMPACT_CHUNK_ROWS = 2000
# A writer waits this long for the lock before SQLite says "database is locked".
BUSY_TIMEOUT_SECONDS = 5.0


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_SECONDS
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = _connect(path)
        self.db.executescript(SCHEMA)
        have = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if have is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif have[0] in UPGRADES:
            with self._tx():
                UPGRADES[have[0]](self.db)
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        elif have[0] != SCHEMA_VERSION:
            raise RuntimeError(f"{path}: schema version {have[0]}, this controller needs {SCHEMA_VERSION}")

    def register_agent(self, hello: apb.Hello, peer: str, now_ms: int) -> int:
        self.db.execute(
            """INSERT INTO agents (host, instance_id, hello, peer, first_seen_ms, last_seen_ms)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (host, instance_id) DO UPDATE
               SET hello = excluded.hello, peer = excluded.peer, last_seen_ms = excluded.last_seen_ms""",
            (hello.host, hello.instance_id, hello.SerializeToString(), peer, now_ms, now_ms),
        )
        row = self.db.execute(
            "SELECT last_seq FROM agents WHERE host = ? AND instance_id = ?", (hello.host, hello.instance_id)
        ).fetchone()
        return int(row[0])

    def append_batch(self, host: str, instance_id: str, batch: apb.TelemetryBatch, now_ms: int) -> bool:
        with self._tx():
            row = self.db.execute(
                "SELECT last_seq FROM agents WHERE host = ? AND instance_id = ?", (host, instance_id)
            ).fetchone()
            if row is None:
                raise KeyError(f"agent {host}/{instance_id} never said hello")
            if batch.seq <= row[0]:
                return False
            self.db.executemany(
                f"""INSERT OR IGNORE INTO samples
                   (host, workload, end_ms, start_ms, cgroup, {", ".join(schema.COLUMNS)}, sample)
                   VALUES (?, ?, ?, ?, ?, {", ".join("?" for _ in schema.COLUMNS)}, ?)""",
                [
                    (
                        host,
                        s.workload,
                        s.end_unix_ms,
                        s.start_unix_ms,
                        s.cgroup,
                        *schema.values(s),
                        s.SerializeToString(),
                    )
                    for s in batch.samples
                ],
            )
            self.db.execute(
                """UPDATE agents SET last_seq = ?, last_seen_ms = ?, last_telemetry_ms = ?
                   WHERE host = ? AND instance_id = ?""",
                (batch.seq, now_ms, now_ms, host, instance_id),
            )
            return True

    def touch_agent(self, host: str, instance_id: str, now_ms: int) -> None:
        self.db.execute(
            "UPDATE agents SET last_seen_ms = ? WHERE host = ? AND instance_id = ?",
            (now_ms, host, instance_id),
        )

    def agents(self) -> list[AgentRecord]:
        rows = self.db.execute(
            """SELECT host, instance_id, hello, peer, last_seq, first_seen_ms, last_seen_ms, last_telemetry_ms
               FROM agents a
               -- the instance heard from last: a newer instance that came and went (a rogue with the
               -- host's certificate, an aborted start) must not hide the agent that is running
               WHERE last_seen_ms = (SELECT MAX(last_seen_ms) FROM agents b WHERE b.host = a.host)
               ORDER BY host"""
        ).fetchall()
        return [
            AgentRecord(r[0], r[1], apb.Hello.FromString(r[2]), r[3], r[4], r[5], r[6], r[7]) for r in rows
        ]

    def agent(self, host: str) -> AgentRecord | None:
        r = self.db.execute(
            """SELECT host, instance_id, hello, peer, last_seq, first_seen_ms, last_seen_ms, last_telemetry_ms
               FROM agents WHERE host = ? ORDER BY last_seen_ms DESC LIMIT 1""",
            (host,),
        ).fetchone()
        if r is None:
            return None
        return AgentRecord(r[0], r[1], apb.Hello.FromString(r[2]), r[3], r[4], r[5], r[6], r[7])

    def samples(
        self, host: str, workload: str = "", cgroup: str = "", since_ms: int = 0, limit: int = 60
    ) -> list[tuple[str, tpb.WorkloadSample]]:
        return [
            (h, tpb.WorkloadSample.FromString(b))
            for h, b in self.sample_blobs(host, workload, cgroup, since_ms, limit)
        ]

    def sample_blobs(
        self, host: str, workload: str = "", cgroup: str = "", since_ms: int = 0, limit: int = 60
    ) -> list[tuple[str, bytes]]:
        where, args = _where(["host = ?", "end_ms >= ?"], [host, since_ms], workload=workload, cgroup=cgroup)
        if workload:
            # One workload: its newest rows straight off the primary key, not a sort of its whole history
            # (the scaling cycle and /metrics ask for the latest sample of each shadow all the time).
            rows = self.db.execute(
                f"SELECT host, sample FROM samples WHERE {where} ORDER BY end_ms DESC LIMIT ?", (*args, limit)
            ).fetchall()
            rows.reverse()
        else:
            rows = self.db.execute(
                f"""SELECT host, sample FROM (
                      SELECT host, workload, end_ms, sample,
                             ROW_NUMBER() OVER (PARTITION BY workload ORDER BY end_ms DESC) AS n
                      FROM samples WHERE {where})
                    WHERE n <= ? ORDER BY end_ms, workload""",
                (*args, limit),
            ).fetchall()
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def resource_series(
        self, since_ms: int = 0, host: str = "", workload: str = ""
    ) -> dict[tuple[str, str], dict[str, list[float]]]:
        # Samples, and the compacted steps as one row each at the step's end, weighted by the samples it
        # holds: resampled onto a grid of a multiple of their step they give what the samples would have.
        where, args = _where(["end_ms >= ?"], [since_ms], host=host, workload=workload)
        # a step whose samples may all be after the bound: began at it or later (the first condition is the
        # index's, which the second alone would not use)
        swhere, sargs = _where(
            ["step * step_ms >= ?", "(step - 1) * step_ms >= ?"],
            [since_ms, since_ms],
            host=host,
            workload=workload,
        )
        cols = ("end_ms", "weight", *schema.COLUMNS)
        out: dict[tuple[str, str], dict[str, list[float]]] = {}
        for row in self.db.execute(
            f"""SELECT host, workload, end_ms, 1, {", ".join(schema.COLUMNS)} FROM samples WHERE {where}
                UNION ALL
                SELECT host, workload, step * step_ms, samples, {", ".join(schema.COLUMNS)} FROM steps
                WHERE {swhere}
                ORDER BY 1, 2, 3""",
            (*args, *sargs),
        ):
            series = out.setdefault((row[0], row[1]), {c: [] for c in cols})
            for c, v in zip(cols, row[2:], strict=True):
                series[c].append(float(v))
        return out

    def step_aggregates(
        self, since_ms: int, step_ms: int
    ) -> tuple[dict[tuple[str, str], StepAggregate], dict[tuple[str, str], int]]:
        if step_ms < 1:
            raise ValueError(f"step_ms must be at least 1, got {step_ms}")
        # SQLite bins and combines (one row per workload and step instead of one per sample: a day at a
        # 10 s interval is 30 times fewer rows to bring into Python); one read transaction for both
        # queries, so the seqs describe exactly the samples aggregated. A deferred BEGIN, not `_tx()`'s
        # BEGIN IMMEDIATE: this long read must not hold the write lock the event loop's ingest needs.
        # Samples and compacted steps alike, binned by their end: a step compacted at the requested step
        # (or a divisor of it) lands whole in one bin, its mean weighted by the samples it holds.
        cols = schema.COLUMNS
        per_sample = ", ".join(
            f"{'MAX' if s.combine == 'max' else 'AVG'}({s.column}) AS {s.column}" for s in schema.SERIES
        )
        merged = ", ".join(
            f"MAX({s.column})" if s.combine == "max" else f"SUM({s.column} * n) / SUM(n)"
            for s in schema.SERIES
        )
        self.db.execute("BEGIN")
        try:
            rows = self.db.execute(
                f"""SELECT host, workload, step, SUM(n), {merged} FROM (
                      SELECT host, workload, (end_ms + ? - 1) / ? AS step, COUNT(*) AS n, {per_sample}
                      FROM samples WHERE end_ms > ? GROUP BY host, workload, step
                      UNION ALL
                      SELECT host, workload, (step * step_ms + ? - 1) / ?, samples, {", ".join(cols)}
                      FROM steps WHERE step * step_ms > ?)
                    GROUP BY host, workload, step ORDER BY host, workload, step""",
                (step_ms, step_ms, since_ms, step_ms, step_ms, since_ms),
            ).fetchall()
            seqs = {
                (str(h), str(i)): int(q)
                for h, i, q in self.db.execute("SELECT host, instance_id, last_seq FROM agents")
            }
        finally:
            self.db.execute("COMMIT")
        out: dict[tuple[str, str], StepAggregate] = {}
        for (host, workload), part in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
            a = np.array([r[2:] for r in part], dtype=np.float64)
            out[(str(host), str(workload))] = StepAggregate(
                a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), np.ascontiguousarray(a[:, 2:].T)
            )
        return out, seqs

    def compact(self, older_than_ms: int, step_ms: int) -> int:
        if step_ms < 1:
            raise ValueError(f"step_ms must be at least 1, got {step_ms}")
        # Whole steps only: a step still receiving samples is left to the next round. A chunk may still end
        # inside a step, and a sample may arrive late (an agent's backlog) for a step already folded: both
        # merge into the step's row (counts add, means weighted by them, maxima of maxima), so folding in
        # any number of pieces gives the same row. Each chunk inserts and deletes in one transaction: a
        # sample is in `samples` or in a step, never both, never neither.
        cutoff = older_than_ms // step_ms * step_ms
        cols = schema.COLUMNS
        per_sample = ", ".join(
            f"{'MAX' if s.combine == 'max' else 'AVG'}({s.column}) AS {s.column}" for s in schema.SERIES
        )
        merge = ", ".join(
            f"{s.column} = MAX({s.column}, excluded.{s.column})"
            if s.combine == "max"
            else f"{s.column} = ({s.column} * samples + excluded.{s.column} * excluded.samples)"
            f" / (samples + excluded.samples)"
            for s in schema.SERIES
        )
        total = 0
        while True:
            began = time.monotonic()
            row = self.db.execute(
                "SELECT end_ms FROM samples WHERE end_ms <= ? ORDER BY end_ms LIMIT 1 OFFSET ?",
                (cutoff, COMPACT_CHUNK_ROWS),
            ).fetchone()
            upto = cutoff if row is None else int(row[0])
            with self._tx():
                self.db.execute(
                    f"""INSERT INTO steps (host, workload, step_ms, step, samples, {", ".join(cols)})
                        SELECT host, workload, ?, (end_ms + ? - 1) / ?, COUNT(*), {per_sample}
                        FROM samples WHERE end_ms <= ? GROUP BY host, workload, 4
                        ON CONFLICT (host, workload, step_ms, step) DO UPDATE
                        SET samples = samples + excluded.samples, {merge}""",
                    (step_ms, step_ms, step_ms, upto),
                )
                n = self.db.execute("DELETE FROM samples WHERE end_ms <= ?", (upto,)).rowcount
            total += n
            if row is None:
                return total
            time.sleep(time.monotonic() - began)

    def prune(self, older_than_ms: int) -> int:
        # In chunks (PRUNE_CHUNK_ROWS): one DELETE of a week's backlog would hold the write lock for seconds.
        total = 0
        for table, key, until in (
            ("samples", "host, workload, end_ms", "end_ms"),
            ("steps", "host, workload, step_ms, step", "step * step_ms"),
        ):
            while True:
                began = time.monotonic()
                cur = self.db.execute(
                    f"""DELETE FROM {table} WHERE ({key}) IN
                       (SELECT {key} FROM {table} WHERE {until} < ? LIMIT ?)""",
                    (older_than_ms, PRUNE_CHUNK_ROWS),
                )
                total += cur.rowcount
                if cur.rowcount < PRUNE_CHUNK_ROWS:
                    break
                time.sleep(time.monotonic() - began)
        return total

    def service_state(self, name: str) -> ServiceRecord | None:
        row = self.db.execute(
            """SELECT name, owner, token, phase, candidate, last_failover_ms, last_transition_ms
               FROM service_state WHERE name = ?""",
            (name,),
        ).fetchone()
        return ServiceRecord(*row) if row else None

    def save_service_state(self, rec: ServiceRecord) -> None:
        have = self.service_state(rec.name)
        if have is not None and rec.token < have.token:
            raise ValueError(f"service {rec.name}: token would go back from {have.token} to {rec.token}")
        self.db.execute(
            "INSERT OR REPLACE INTO service_state VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rec.name,
                rec.owner,
                rec.token,
                rec.phase,
                rec.candidate,
                rec.last_failover_ms,
                rec.last_transition_ms,
            ),
        )

    def add_event(self, ev: EventRecord) -> EventRecord:
        cur = self.db.execute(
            "INSERT INTO events (unix_ms, kind, service, host, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (ev.unix_ms, ev.kind, ev.service, ev.host, ev.reason, json.dumps(ev.detail, sort_keys=True)),
        )
        return dataclasses.replace(ev, id=int(cur.lastrowid or 0))

    def events(self, service: str = "", after_id: int = 0, limit: int = 100) -> list[EventRecord]:
        where, args = _where(["id > ?"], [after_id], service=service)
        order = "ASC" if after_id else "DESC"
        rows = self.db.execute(
            f"""SELECT id, unix_ms, kind, service, host, reason, detail FROM events
                WHERE {where} ORDER BY id {order} LIMIT ?""",
            (*args, limit),
        ).fetchall()
        out = [EventRecord(r[2], r[3], r[4], r[5], r[1], json.loads(r[6]), r[0]) for r in rows]
        return sorted(out, key=lambda e: e.id)

    def add_decisions(self, decisions: list[ScalingDecision]) -> list[ScalingDecision]:
        out = []
        with self._tx():
            for d in decisions:
                cur = self.db.execute(
                    """INSERT INTO scaling_decisions (unix_ms, service, host, workload, resource, decision)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (d.unix_ms, d.service, d.host, d.workload, d.resource, _encode(replace(d, id=0))),
                )
                out.append(replace(d, id=int(cur.lastrowid or 0)))
        return out

    def decisions(
        self, host: str = "", workload: str = "", service: str = "", last: int = 5
    ) -> list[ScalingDecision]:
        where, args = _where(["1 = 1"], [], host=host, workload=workload, service=service)
        rows = self.db.execute(
            f"""SELECT id, decision FROM (
                  SELECT id, decision,
                         ROW_NUMBER() OVER (PARTITION BY host, workload, resource ORDER BY id DESC) n
                  FROM scaling_decisions WHERE {where})
                WHERE n <= ? ORDER BY id""",
            (*args, last),
        ).fetchall()
        return [replace(_decode(ScalingDecision, r[1]), id=int(r[0])) for r in rows]

    def set_override(self, o: Override) -> None:
        if o.kind == "clear":
            self.db.execute(
                "DELETE FROM scaling_overrides WHERE host = ? AND workload = ?", (o.host, o.workload)
            )
        else:
            self.db.execute(
                "INSERT OR REPLACE INTO scaling_overrides VALUES (?, ?, ?)", (o.host, o.workload, _encode(o))
            )

    def overrides(self) -> dict[tuple[str, str], Override]:
        rows = self.db.execute("SELECT host, workload, override FROM scaling_overrides").fetchall()
        return {(r[0], r[1]): _decode(Override, r[2]) for r in rows}

    def another_connection(self) -> SqliteStore:
        """The same database on a new connection, for the store worker's thread; `:memory:` cannot be
        opened twice, so it is this store itself."""
        if str(self.path) == ":memory:":
            return self
        other = SqliteStore.__new__(SqliteStore)
        other.path, other.db = self.path, _connect(self.path)
        return other

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)


T = TypeVar("T")


def _encode(record: ScalingDecision | Override) -> str:
    """A decision or override as the store keeps it: JSON of the dataclass's fields."""
    return json.dumps(dataclasses.asdict(record), sort_keys=True)


def _decode(cls: type[T], text: str | bytes) -> T:
    return cls(**json.loads(text))


def _decisions_and_overrides_to_json(db: sqlite3.Connection) -> None:
    """Schema 2 kept decisions and overrides as the Fleet API's protobuf bytes; their fields have the same
    names as the dataclasses', so each row is carried over field by field."""

    def fields(m: fpb.ScalingDecision | fpb.Override) -> dict[str, Any]:
        return {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}

    for row_id, blob in db.execute("SELECT id, decision FROM scaling_decisions").fetchall():
        d = ScalingDecision(**{**fields(fpb.ScalingDecision.FromString(blob)), "id": 0})
        db.execute(
            "UPDATE scaling_decisions SET decision = ? WHERE id = ?",
            (_encode(replace(d, forecast=dict(d.forecast))), row_id),
        )
    for host, workload, blob in db.execute(
        "SELECT host, workload, override FROM scaling_overrides"
    ).fetchall():
        o = Override(**fields(fpb.Override.FromString(blob)))
        db.execute(
            "UPDATE scaling_overrides SET override = ? WHERE host = ? AND workload = ?",
            (_encode(o), host, workload),
        )


def _where(fixed: list[str], args: list[object], **equal: str) -> tuple[str, list[object]]:
    """A WHERE clause: the fixed conditions, plus `column = ?` for each filter given (empty: no filter).
    Column names come from our own keywords, never from input."""
    clauses, values = list(fixed), list(args)
    for column, value in equal.items():
        if value:
            clauses.append(f"{column} = ?")
            values.append(value)
    return " AND ".join(clauses), values


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        # Nested in another (a journal import stores decisions): the outer one commits or rolls back.
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.outer:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
