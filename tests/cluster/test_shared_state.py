"""The replicas' shared state through a real 3-member etcd cluster (mutual TLS, on loopback): service
records changed only by compare-and-set (a replica that lost leadership cannot overwrite its successor's
record, nor hand out a token twice), and the journal that gives every replica the same events, decisions
and overrides, imported once each, also across a restart."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from controller.cluster.journal import DECISIONS_PER_ENTRY, Journal, JournaledStore
from controller.cluster.records import EtcdRecords
from controller.event_log import EventLog
from controller.failover.records import RecordConflict
from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from controller.store import EventRecord, ServiceRecord
from lab.etcd import EtcdCluster
from tests.support import wait_until

T = TypeVar("T")


def test_a_stale_replica_cannot_overwrite_the_record_or_reuse_a_token(etcd: EtcdCluster) -> None:
    prefix = f"/test/{uuid.uuid4().hex}"
    a, b = EtcdRecords(etcd.dcs(), prefix), EtcdRecords(etcd.dcs(), prefix)

    async def go() -> None:
        await a.refresh()
        await b.refresh()
        assert a.get("web") == ServiceRecord("web") == b.get("web")
        # a leads: places web with token 1, then starts a failover with token 2
        await a.save(ServiceRecord("web", owner="p1", token=1, phase="stable"))
        await b.refresh()
        assert b.get("web").token == 1
        await a.save(ServiceRecord("web", owner="p1", token=2, phase="acquiring", candidate="s1"))
        # b still holds the copy of token 1 (it lost leadership before a wrote token 2, say): its save of
        # token 2 would hand the same token to another host. Refused, and b's copy catches up.
        with pytest.raises(RecordConflict, match="changed by another replica"):
            await b.save(ServiceRecord("web", owner="s2", token=2, phase="acquiring", candidate="s2"))
        assert b.get("web") == ServiceRecord("web", owner="p1", token=2, phase="acquiring", candidate="s1")
        # with the fresh copy b fences a's half-done takeover with a newer token
        rec = await b.save(ServiceRecord("web", owner="", token=2, phase="no-owner"))
        assert rec.phase == "no-owner"
        with pytest.raises(RecordConflict):
            await a.save(ServiceRecord("web", owner="s1", token=2, phase="stable"))
        await a.refresh()
        assert a.get("web").phase == "no-owner", "a never overwrote b's record"

    asyncio.run(go())
    a.close()
    b.close()


def _decision(n: int) -> ScalingDecision:
    return ScalingDecision(
        unix_ms=1_000 + n,
        service="web",
        host="s1",
        workload="web",
        resource="cpu",
        demand_from="p1/web",
        forecast={"q0.99": 1.5, "target": 1.5},
        predicted=1.5,
        old=1.0,
        new=1.75,
        branch="add",
        result="applied",
        applied=1.75,
    )


def test_every_replica_gets_the_same_history_once(etcd: EtcdCluster, tmp_path: Path) -> None:
    prefix = f"/test/{uuid.uuid4().hex}"
    store_a, store_b = JournaledStore(tmp_path / "a.db"), JournaledStore(tmp_path / "b.db")
    ja = Journal(etcd.dcs(), prefix, "ctl1", store_a)
    jb = Journal(etcd.dcs(), prefix, "ctl2", store_b)
    events_a, events_b = EventLog(store_a), EventLog(store_b)
    heard: list[EventRecord] = []
    events_b.listeners.append(heard.append)
    store_b.on_imported_event = events_b.deliver

    def shown(store: JournaledStore) -> list[tuple[str, str, str, int]]:
        return [(e.kind, e.host, e.reason, e.unix_ms) for e in store.events(limit=1000)]

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    async def go() -> None:
        events_a.record("failover", "web", "s1", "owner p1 is down", token=2)
        store_a.add_decisions([_decision(1), replace(_decision(2), host="s2")])
        store_a.set_override(Override("s1", "web", "pin", cpu_cores=2.0, reason="load test", by="ops"))
        events_a.record("failover-complete", "web", "s1", "p1 -> s1 in 2100 ms")
        wait_until(lambda: ja.pending == 0, 10, "ctl1's journal to reach etcd")
        assert await jb.catch_up(run) == 4  # 2 events, 1 batch of decisions, 1 override
        # then ctl2 records one of its own (an operator's override through it)
        events_b.record("override", "web", "s1", "freeze by ops@ctl2")
        wait_until(lambda: jb.pending == 0, 10, "ctl2's journal to reach etcd")
        assert await ja.catch_up(run) == 1
        assert await jb.catch_up(run) == 0, "nothing imported twice"

    asyncio.run(go())
    # the same history on both, in the log's order
    assert shown(store_a) == shown(store_b)
    assert [k for k, *_ in shown(store_b)] == ["failover", "failover-complete", "override"]
    assert [e.kind for e in heard] == ["failover", "failover-complete", "override"], "watchers hear imports"
    assert [d.new for d in store_b.decisions(last=5)] == [1.75, 1.75]
    assert store_b.overrides()[("s1", "web")].cpu_cores == 2.0
    ja.close()
    jb.close()
    store_b.close()
    # a restarted replica goes on from where its store says it was: nothing imported again
    again = JournaledStore(tmp_path / "b.db")
    jb2 = Journal(etcd.dcs(), prefix, "ctl2", again)
    assert asyncio.run(jb2.catch_up(run)) == 0
    assert shown(again) == shown(store_a)
    jb2.close()


def test_an_unreadable_journal_entry_is_skipped_and_the_rest_imported(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Entries from a newer or broken replica (unknown fields, not JSON at all) are said and skipped; the
    replica goes on importing the readable ones and never stops reading the log."""
    prefix = f"/test/{uuid.uuid4().hex}"
    dcs = etcd.dcs()
    dcs.put(f"{prefix}/journal/0000000000001-ctl9-000000001", b"not json")
    dcs.put(
        f"{prefix}/journal/0000000000002-ctl9-000000002",
        b'{"kind": "event", "origin": "ctl9", "body": {"kind": "x", "colour": "blue"}}',
    )
    dcs.put(
        f"{prefix}/journal/0000000000003-ctl9-000000003",
        b'{"kind": "event", "origin": "ctl9", "body": {"kind": "failover", "service": "web", "host": "s1",'
        b' "reason": "owner p1 is down", "unix_ms": 3, "detail": {}}}',
    )
    store = JournaledStore(tmp_path / "b.db")
    journal = Journal(etcd.dcs(), prefix, "ctl2", store)

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    asyncio.run(journal.catch_up(run))
    assert [(e.kind, e.reason) for e in store.events(limit=10)] == [("failover", "owner p1 is down")]
    assert store.journal_revision() > 0, "read past the unreadable ones"
    journal.close()


def test_decisions_are_shared_when_they_change_in_bounded_entries(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A cycle records a decision for every shadow resource every 10 s; etcd is sized for metadata. Shared:
    what changed something, in entries of at most DECISIONS_PER_ENTRY; an unchanged decision is not shared
    again before SNAPSHOT_SECONDS."""
    prefix = f"/test/{uuid.uuid4().hex}"
    store = JournaledStore(tmp_path / "a.db")
    journal = Journal(etcd.dcs(), prefix, "ctl1", store)

    def fleet(new: float) -> list[ScalingDecision]:
        return [replace(_decision(0), host=f"s{i}", new=new) for i in range(DECISIONS_PER_ENTRY * 2 + 50)]

    def entries() -> list[int]:
        got = etcd.dcs().scan(f"{prefix}/journal/")
        return [len(json.loads(v.value)["body"]["list"]) for _, v in got]

    store.add_decisions(fleet(1.75))
    wait_until(lambda: journal.pending == 0, 10, "the journal to reach etcd")
    assert entries() == [DECISIONS_PER_ENTRY, DECISIONS_PER_ENTRY, 50]
    store.add_decisions(fleet(1.75))  # the next cycle: nothing changed
    store.add_decisions([replace(_decision(0), host="s7", new=2.5)])  # one limit changed
    wait_until(lambda: journal.pending == 0, 10, "the journal to reach etcd")
    assert entries() == [DECISIONS_PER_ENTRY, DECISIONS_PER_ENTRY, 50, 1]
    # every cycle's decisions stay in the replica's own store: 250 twice, and the change
    assert len(store.decisions(last=10)) == 2 * (DECISIONS_PER_ENTRY * 2 + 50) + 1
    journal.close()


def test_an_entry_too_large_for_etcd_is_kept_locally_and_the_journal_goes_on(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/test/{uuid.uuid4().hex}"
    store_a, store_b = JournaledStore(tmp_path / "a.db"), JournaledStore(tmp_path / "b.db")
    ja, jb = Journal(etcd.dcs(), prefix, "ctl1", store_a), Journal(etcd.dcs(), prefix, "ctl2", store_b)
    events = EventLog(store_a)
    events.record("note", "web", "", "x" * (2 << 20))  # over etcd's request limit (1.5 MiB by default)
    events.record("failover", "web", "s1", "owner p1 is down")
    wait_until(lambda: ja.pending == 0, 20, "the journal to get past the refused entry")
    assert ja.dropped == 1 and "over 1048576" in ja.last_error, ja.last_error

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    asyncio.run(jb.catch_up(run))
    assert [e.kind for e in store_b.events(limit=10)] == ["failover"]
    assert [e.kind for e in store_a.events(limit=10)] == ["note", "failover"], "kept where it was recorded"
    ja.close()
    jb.close()
