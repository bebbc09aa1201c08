"""The Fleet API's scaling calls against a real controller over gRPC on loopback: `GetPlan` renders the
status view and the store, `SetOverride` validates an operator's hold, keeps it and shows it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from controller.scaling.decision import ScalingDecision
from controller.server import start
from lab.procs import free_port
from shadowplane.clock import now_ms
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import telemetry_pb2 as tpb
from tests.support import fleet_api_config


def test_plan_and_overrides_through_the_fleet_api(tmp_path: Path) -> None:
    async def scenario() -> None:
        port = free_port()
        c = await start(fleet_api_config(tmp_path, port))
        try:
            # s1's agent once said hello with its shadow workload; a decision was recorded for it
            hello = apb.Hello(
                host="s1",
                instance_id="s1-1",
                workloads=[tpb.WorkloadInfo(name="web", cgroup="/web", role=tpb.ROLE_SHADOW, service="web")],
            )
            c.store.register_agent(hello, "peer", now_ms())
            primary = apb.Hello(
                host="p1",
                instance_id="p1-1",
                workloads=[tpb.WorkloadInfo(name="web", cgroup="/web", role=tpb.ROLE_PRIMARY, service="web")],
            )
            c.store.register_agent(primary, "peer", now_ms())
            d = ScalingDecision(
                now_ms(), "web", "s1", "web", "cpu", "p1/web", {"q0.5": 0.4, "target": 0.6}, 0.6, 1.0, 0.8,
                "remove", clamps="floor", forecast_source="model", result="applied", applied=0.8,
            )  # fmt: skip
            c.store.add_decisions([d])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                fleet = fgrpc.FleetStub(ch)
                refused = await fleet.SetOverride(
                    fpb.Override(host="s1", workload="db", kind="pin", cpu_cores=1)
                )
                assert not refused.accepted and "no workload 'db' on host 's1'" in refused.reason
                refused = await fleet.SetOverride(fpb.Override(host="s1", workload="web", kind="pin"))
                assert not refused.accepted and "pin needs a CPU and/or a memory value" in refused.reason
                # A primary's limits are never sized: a hold on it would be stored and never applied.
                for kind in ("pin", "bound", "freeze"):
                    refused = await fleet.SetOverride(
                        fpb.Override(host="p1", workload="web", kind=kind, cpu_cores=1, cpu_max=2)
                    )
                    assert not refused.accepted, kind
                    assert refused.reason.startswith(f"p1/web is a primary: {kind} applies to shadows"), (
                        refused.reason
                    )
                    assert f"e.g. shadowctl {kind} s1/web" in refused.reason, refused.reason
                assert (await fleet.GetPlan(fpb.GetPlanRequest(workload="p1/web"))).shadows == []
                ok = await fleet.SetOverride(
                    fpb.Override(host="s1", workload="web", kind="pin", cpu_cores=0.5, reason="load test")
                )
                assert ok.accepted, ok.reason

                plan = await fleet.GetPlan(fpb.GetPlanRequest(workload="web"))
                (shadow,) = plan.shadows
                assert (shadow.host, shadow.workload, shadow.ready) == ("s1", "web", False)
                assert shadow.reason == "not sized yet"
                assert shadow.override.kind == "pin" and shadow.override.cpu_cores == 0.5
                assert shadow.override.by == "plaintext client" and shadow.override.unix_ms > 0
                (last,) = plan.last
                assert (last.old, last.new, last.branch, last.clamps, last.result) == (
                    1.0,
                    0.8,
                    "remove",
                    "floor",
                    "applied",
                )
                assert dict(last.forecast) == {"q0.5": 0.4, "target": 0.6} and last.id == 1
                assert plan.next_cycle_unix_ms > 0
                events = await fleet.ListEvents(fpb.ListEventsRequest(limit=10))
                assert [e.reason for e in events.events if e.kind == "override"] == [
                    "web: pin by plaintext client: load test"
                ]

                cleared = await fleet.SetOverride(fpb.Override(host="s1", workload="web", kind="clear"))
                assert cleared.accepted
                plan = await fleet.GetPlan(fpb.GetPlanRequest(workload="s1/web"))
                assert not plan.shadows[0].HasField("override")
                other = await fleet.GetPlan(fpb.GetPlanRequest(workload="s2/web"))
                assert not other.shadows and not other.last
        finally:
            await c.stop()

    asyncio.run(scenario())
