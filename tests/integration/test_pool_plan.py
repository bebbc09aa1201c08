"""The resource pool over the Fleet API, against a real controller on loopback: `GetPoolPlan` places each
service's shadow outside its primary's zone, counts every single-host and single-zone failure for the pool's
plan, for the configured shadows and for the alternatives; `ListZones` shows a zone whose hosts are gone
as degraded, and the plan then puts nothing there. The forecasts are put into the scaling loop by the test
(what the cycle would have made of the primaries' telemetry): the pool's input, not what is tested here."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

from controller.config import FailoverConfig, HealthCheckConfig, HostEntry, ServiceConfig
from controller.registry import AgentSession
from controller.scaling.loop import ServiceForecast
from controller.server import start
from lab.procs import free_port
from shadowplane.clock import now_ms
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from tests.integration.test_shadowctl_output import piped
from tests.support import fleet_api_config

QUANTILES = (0.1, 0.5, 0.9, 0.99)


def forecast(service: str, key: str, cores: float, gib: float) -> ServiceForecast:
    """A flat forecast: each quantile a little above the last, the same over the horizon."""
    scale = np.array([0.8, 1.0, 1.2, 1.5])
    curves = {
        "cpu": np.tile(cores * scale, (6, 1)),
        "memory": np.tile(gib * 2**30 * scale, (6, 1)),
        "io": np.zeros((6, 4)),
    }
    last = dict.fromkeys(curves, float("nan"))  # no step measured yet
    return ServiceForecast(key, time.time(), QUANTILES, curves, last, "model")


def test_pool_plan_and_zones_through_the_fleet_api(tmp_path: Path) -> None:
    async def scenario() -> None:
        port = free_port()
        hosts = [
            HostEntry("a1", "a", "127.0.0.1", cores=16, memory_gib=64, price_per_hour=1.6),
            HostEntry("b1", "b", "127.0.0.1", cores=16, memory_gib=64, price_per_hour=1.6),
            HostEntry("c1", "c", "127.0.0.1", cores=16, memory_gib=64, price_per_hour=1.6),
            HostEntry("c2", "c", "127.0.0.1", cores=32, memory_gib=128, price_per_hour=1.2),  # cheap
        ]
        # every host's service is "up" for the controller's own health checks: a TCP connect to the
        # controller itself (the hosts are all 127.0.0.1 here); the test decides who is down
        up = HealthCheckConfig(kind="tcp", port=port)
        services = [
            ServiceConfig("web", "a1", ["b1"], vip="10.0.0.100/24", health=up),
            ServiceConfig("api", "b1", ["a1"], vip="10.0.0.101/24", health=up),
            ServiceConfig("db", "c1", ["a1"], vip="10.0.0.102/24", health=up),
        ]
        cfg = replace(
            fleet_api_config(tmp_path, port),
            host=hosts,
            service=services,
            # agents that send no heartbeats stay alive; no wait for primaries before judging zones
            failover=FailoverConfig(placement_grace_seconds=0.0, heartbeat_timeout_seconds=600),
        )
        c = await start(cfg)
        try:
            sessions = {
                h.name: AgentSession(
                    h.name, f"{h.name}-1", "peer", apb.Hello(host=h.name), now_ms(), now_ms()
                )
                for h in hosts
            }
            for session in sessions.values():
                c.registry.attach(session)
            assert c.scaling is not None
            for name, primary, cores in (("web", "a1", 4.0), ("api", "b1", 3.0), ("db", "c1", 2.0)):
                c.scaling.forecasts[name] = forecast(name, f"{primary}/{name}", cores, 4.0)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                fleet = fgrpc.FleetStub(ch)
                zones = await fleet.ListZones(fpb.ListZonesRequest())
                assert [(z.zone, z.degraded) for z in zones.zones] == [
                    ("a", False),
                    ("b", False),
                    ("c", False),
                ]

                plan = await fleet.GetPoolPlan(fpb.GetPoolPlanRequest())
                got = {s.service: s for s in plan.services}
                zone = {h.name: h.zone for h in hosts}
                for s in got.values():
                    assert s.shadow and zone[s.shadow] != zone[s.primary], s
                # q0.95 between the forecast's q0.9 (1.2x) and q0.99 (1.5x), at its peak
                assert 1.2 * 4 < got["web"].cpu_cores < 1.5 * 4
                # web and api (zones a, b) share the cheap c2: it reserves for the larger, not the sum
                assert got["web"].shadow == got["api"].shadow == "c2"
                c2 = next(r for r in plan.reserves if r.host == "c2")
                assert c2.cores == got["web"].cpu_cores and c2.worst in ("host a1", "zone a")
                by = {p.name: p for p in plan.placements}
                assert set(by) == {"pool", "configured", "dedicated 1:1", "naive N+1 per zone"}
                pool = by["pool"]
                assert (pool.host_covered, pool.host_scenarios, pool.zone_covered, pool.zone_scenarios) == (
                    3, 3, 3, 3,
                )  # fmt: skip
                assert pool.price_per_hour < by["dedicated 1:1"].price_per_hour
                # the configured shadows: api and db both land on a1 when... each fails alone: covered too,
                # but dearer (three 1.6/h hosts reserve where the pool uses one 1.2/h host mostly)
                assert by["configured"].price_per_hour > pool.price_per_hour
                assert by["naive N+1 per zone"].zone_covered == 0
                assert plan.solver.startswith("HiGHS") and "q0.95" in plan.demand

            # what an operator reads: shadowctl pool plan, in a pipe, and its JSON
            shown = await asyncio.to_thread(piped, port, "pool", "plan")
            assert shown.returncode == 0, shown.stderr
            for text in ("placements", "dedicated 1:1", "3/3", "c2", "reserve per host", "host a1"):
                assert text in shown.stdout, (text, shown.stdout)
            as_json = await asyncio.to_thread(piped, port, "pool", "plan", "--json")
            assert json.loads(as_json.stdout)["placements"][0]["name"] == "pool"

            # zone c's hosts go away: degraded, an event says why, and the plan puts nothing there
            for h in ("c1", "c2"):
                c.registry.detach(sessions[h])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                fleet = fgrpc.FleetStub(ch)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    zones = await fleet.ListZones(fpb.ListZonesRequest())
                    if any(z.degraded for z in zones.zones):
                        break
                    await asyncio.sleep(0.1)
                (c_zone,) = [z for z in zones.zones if z.degraded]
                assert c_zone.zone == "c" and set(c_zone.down) == {"c1", "c2"}
                assert "its agent is not heard from" in c_zone.reason
                events = await fleet.ListEvents(fpb.ListEventsRequest(limit=50))
                assert any(e.kind == "zone-degraded" and e.detail["zone"] == "c" for e in events.events)
                plan = await fleet.GetPoolPlan(fpb.GetPoolPlanRequest())
                shadows = {s.service: s.shadow for s in plan.services}
                assert "c1" not in shadows.values() and "c2" not in shadows.values()
                assert shadows["web"] == "b1" and shadows["api"] == "a1"
            zones_shown = await asyncio.to_thread(piped, port, "zones")
            assert zones_shown.returncode == 0 and "degraded" in zones_shown.stdout, zones_shown
        finally:
            await c.stop()

    asyncio.run(scenario())
