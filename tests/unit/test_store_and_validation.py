from __future__ import annotations

import sqlite3
from pathlib import Path

from controller.store import SqliteStore
from controller.store import sqlite as sqlite_store
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb


def hello(host: str = "h1", instance: str = "i1") -> apb.Hello:
    return apb.Hello(
        host=host,
        instance_id=instance,
        workloads=[tpb.WorkloadInfo(name="web", cgroup="/w")],
        interval_ms=1000,
    )


def batch(seq: int, end_ms: int, workload: str = "web") -> apb.TelemetryBatch:
    s = tpb.WorkloadSample(workload=workload, cgroup="/w", start_unix_ms=end_ms - 1000, end_unix_ms=end_ms)
    s.resources.cpu_seconds = 0.5
    s.syscalls.total = 1000
    s.syscalls.by_name["accept4"] = 10
    return apb.TelemetryBatch(seq=seq, samples=[s])


def test_store_dedupes_and_resumes(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    st = SqliteStore(db)
    assert st.register_agent(hello(), "peer", 1) == 0
    assert st.append_batch("h1", "i1", batch(1, 10_000), 2)
    assert st.append_batch("h1", "i1", batch(2, 11_000), 3)
    assert not st.append_batch("h1", "i1", batch(2, 11_000), 4)  # resent after a reconnect
    st.close()
    st = SqliteStore(db)  # a controller restart
    assert st.register_agent(hello(), "peer", 5) == 2
    rows = st.samples("h1")
    assert [s.end_unix_ms for _, s in rows] == [10_000, 11_000]
    cpu, accepts = st.db.execute("SELECT cpu_cores, accepts_per_second FROM samples LIMIT 1").fetchone()
    assert (cpu, accepts) == (0.5, 10.0)
    # a new agent instance (restarted agent) starts its own sequence
    assert st.register_agent(hello(instance="i2"), "peer", 6) == 0
    assert [a.instance_id for a in st.agents()] == ["i2"]
    assert (got := st.agent("h1")) is not None and got.instance_id == "i2"
    assert st.agent("h2") is None
    # an instance that came and went (a rogue with the host's certificate) does not hide the one that runs
    st.touch_agent("h1", "i1", 7)
    assert [a.instance_id for a in st.agents()] == ["i1"]
    assert (got := st.agent("h1")) is not None and got.instance_id == "i1"


def test_store_limit_per_workload_and_prune(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "c.db")
    st.register_agent(hello(), "p", 1)
    for i in range(1, 11):
        st.append_batch("h1", "i1", batch(i, i * 1000 + 5000), i)
    assert [s.end_unix_ms for _, s in st.samples("h1", limit=3)] == [13_000, 14_000, 15_000]
    assert len(st.samples("h1", workload="other")) == 0
    assert st.prune(older_than_ms=10_000) == 4
    assert len(st.samples("h1", limit=100)) == 6


def test_a_schema_2_store_keeps_its_decisions_and_overrides(tmp_path: Path) -> None:
    """0.1.0 kept scaling decisions and overrides as the Fleet API's protobuf bytes; an upgraded controller
    reads them all back."""
    from controller.scaling.decision import ScalingDecision
    from controller.scaling.override import Override
    from shadowplane.v1 import fleet_pb2 as fpb

    db = tmp_path / "c.db"
    SqliteStore(db).close()
    old = sqlite3.connect(db)
    d = fpb.ScalingDecision(
        id=1, unix_ms=5, service="web", host="s1", workload="web", resource="cpu", demand_from="p1/web",
        forecast={"q0.5": 0.5, "target": 0.8}, predicted=0.8, old=1.0, new=0.9, branch="remove",
        clamps="floor", result="applied", applied=0.9, forecast_source="model",
    )  # fmt: skip
    old.execute(
        "INSERT INTO scaling_decisions VALUES (1, 5, 'web', 's1', 'web', 'cpu', ?)", (d.SerializeToString(),)
    )
    o = fpb.Override(host="s1", workload="web", kind="bound", cpu_min=0.5, memory_max=2**30, by="alice")
    old.execute("INSERT INTO scaling_overrides VALUES ('s1', 'web', ?)", (o.SerializeToString(),))
    old.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    old.commit()
    old.close()

    st = SqliteStore(db)
    assert st.decisions() == [
        ScalingDecision(
            5, "web", "s1", "web", "cpu", "p1/web", {"q0.5": 0.5, "target": 0.8}, 0.8, 1.0, 0.9, "remove",
            "floor", "model", "applied", 0.9, 1,
        )
    ]  # fmt: skip
    assert st.overrides() == {
        ("s1", "web"): Override("s1", "web", "bound", cpu_min=0.5, memory_max=2**30, by="alice")
    }
    version = st.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (sqlite_store.SCHEMA_VERSION,)
    [(n,)] = st.db.execute("SELECT count(*) FROM scaling_decisions").fetchall()
    st.close()
    assert n == 1
