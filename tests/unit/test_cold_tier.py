"""A `cold` service's shadow is held at the scaling floor until it is needed: it is raised to the forecast
when it takes the service over, and pre-warmed at once when its primary's zone is degraded (docs/pool.md); a
`shared` service's shadow, alike in every other field, is sized to the forecast all along.

The store, the event log, the scaling loop's cycle and the planner are real. The forecast is set, not
computed (the forecaster and its one path are tested in tests/predict), and the shadow's agent is a stand-in
registry that answers SetLimits with what was asked (the agent side is tested against cgroups in
tests/integration/test_limits_kernel.py and tests/vm)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import numpy as np

from controller.config import ControllerConfig, ScalingConfig, ServiceConfig, StoreConfig
from controller.event_log import EventLog
from controller.registry import AgentRegistry
from controller.scaling.decision import ScalingDecision
from controller.scaling.loop import ScalingLoop, ServiceForecast
from controller.store import SqliteStore
from shadowplane.clock import now_ms
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb

GIB = 1 << 30
QUANTILES = (0.1, 0.5, 0.9, 0.99)
DEMAND_CORES = 2.0  # the primary's forecast median, every step of the horizon


class AnsweringRegistry(AgentRegistry):
    """Answers SetLimits as an agent whose kernel then holds what was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[apb.SetLimits] = []

    async def call(self, host: str, cmd: apb.Command, timeout: float) -> apb.CommandResult:
        self.sent.append(cmd.set_limits)
        a = cmd.set_limits
        limits = apb.LimitsApplied(workload=a.workload, cpu_cores=a.cpu_cores, memory_bytes=a.memory_bytes)
        return apb.CommandResult(command_id=cmd.command_id, ok=True, limits=limits)


class Fleet:
    """A primary p1 and its shadow s1 for service web, whose shadow starts sized to the demand (2 cores,
    2 GiB), and a scaling loop over them whose forecast is always the same: 2 cores, 2 GiB at the median."""

    def __init__(self, tmp_path: Path, tier: Literal["dedicated", "shared", "cold"]) -> None:
        self.store = SqliteStore(tmp_path / f"{tier}.db")
        for host in ("p1", "s1"):
            hello = apb.Hello(host=host, instance_id=f"{host}-1")
            hello.workloads.add(name="web", service="web")
            hello.host_info.cpu_cores, hello.host_info.memory_bytes = 8, 16 * GIB
            self.store.register_agent(hello, "peer", now_ms())
        cfg = ControllerConfig(
            tls=TlsConfig(plaintext=True),
            store=StoreConfig(path=tmp_path / f"{tier}.db"),
            scaling=ScalingConfig(),
            service=[ServiceConfig("web", "p1", ["s1"], vip="10.0.0.100/24", tier=tier)],
        )
        self.registry = AnsweringRegistry()
        self.loop = ScalingLoop(cfg, self.store, self.registry, EventLog(self.store))
        self.degraded: dict[str, str] = {}
        self.loop.degraded_hosts = lambda: self.degraded
        spread = np.array([0.8, 1.0, 1.2, 1.4])
        origin = (now_ms() // 1000 // 300) * 300.0
        fc = ServiceForecast(
            key="p1/web",
            origin_s=origin,
            quantiles=QUANTILES,
            curves={
                "cpu": np.tile(DEMAND_CORES * spread, (12, 1)),
                "memory": np.tile(2 * GIB * spread, (12, 1)),
            },
            last={"cpu": DEMAND_CORES, "memory": 2.0 * GIB},
            source="set by the test",
        )

        async def forecast(now: int) -> None:
            self.loop.forecasts = {"web": fc}

        self.loop.forecast = forecast  # type: ignore[method-assign]
        # the shadow as sized for the demand, with little memory of its own in use
        asyncio.run(self.loop._send("s1", apb.SetLimits(workload="web", cpu_cores=2.0, memory_bytes=2 * GIB)))

    def cycle(self) -> dict[str, ScalingDecision]:
        """One scaling cycle (no new forecast step: within the one the forecast is for)."""
        return {d.resource: d for d in asyncio.run(self.loop.cycle())}

    def scale_events(self) -> list[str]:
        return [e.reason for e in self.store.events() if e.kind == "scale" and e.host == "s1"]


def test_a_cold_shadow_is_held_at_the_floor_where_a_shared_one_follows_the_forecast(tmp_path: Path) -> None:
    shared = Fleet(tmp_path, "shared").cycle()
    assert shared["cpu"].predicted >= DEMAND_CORES and shared["cpu"].new >= DEMAND_CORES
    assert shared["memory"].new >= 2 * GIB

    cold = Fleet(tmp_path, "cold")
    d = cold.cycle()
    floor = ScalingConfig().cpu_floor_cores
    # the seed rule's way down, to the floor instead of the forecast: half the distance this step
    assert d["cpu"].predicted == floor and d["cpu"].branch == "remove"
    assert d["cpu"].new == (2.0 + floor) / 2 and d["cpu"].result == "applied"
    assert "cold tier: held at the floor until it takes over" in d["cpu"].clamps
    # memory goes down too (slowly): the demand's memory is not the cold shadow's guard, its own use is
    assert d["memory"].new < 2 * GIB
    # what a takeover raises it to stays the forecast's
    assert cold.loop.targets["web"]["cpu"].predicted >= DEMAND_CORES


def test_a_cold_shadow_is_pre_warmed_at_once_when_its_primarys_zone_is_degraded(tmp_path: Path) -> None:
    cold = Fleet(tmp_path, "cold")
    lowered = cold.cycle()["cpu"].new
    assert lowered < DEMAND_CORES
    again = cold.cycle()["cpu"]
    assert again.new == lowered and again.branch == "hold"  # the rule moves a limit once per step

    cold.degraded = {"p1": "zone az1: 2 of 3 hosts down"}
    d = cold.cycle()  # the same forecast step: a pre-warm does not wait for the next one
    assert d["cpu"].predicted >= DEMAND_CORES and d["cpu"].new >= DEMAND_CORES and d["cpu"].branch == "add"
    assert d["memory"].new >= 2 * GIB
    assert "pre-warmed: the primary's zone is degraded (zone az1: 2 of 3 hosts down)" in d["cpu"].clamps
    assert "web: cold tier, pre-warmed: the primary's zone is degraded (zone az1: 2 of 3 hosts down)" in (
        cold.scale_events()
    )

    cold.degraded = {}
    d = cold.cycle()
    assert d["cpu"].predicted == ScalingConfig().cpu_floor_cores
    # just raised: the lower hold keeps it until it has held a while, as for any limit
    assert d["cpu"].new == d["cpu"].old and "lower hold" in d["cpu"].clamps
    assert cold.scale_events()[-1].startswith("web: cold tier: held at the floor")


def test_a_takeover_raises_a_cold_shadow_and_no_cycle_lowers_it_while_it_takes_over(tmp_path: Path) -> None:
    cold = Fleet(tmp_path, "cold")
    lowered = cold.cycle()["cpu"].new
    svc = cold.loop.cfg.service[0]
    asyncio.run(cold.loop.before_takeover(svc, "s1"))
    raised = cold.registry.sent[-1]
    assert raised.cpu_cores >= DEMAND_CORES > lowered and raised.memory_bytes >= 2 * GIB
    # a cycle before the records name s1 the owner (the takeover still in flight) keeps it raised
    d = cold.cycle()
    assert d["cpu"].predicted >= DEMAND_CORES and d["cpu"].new >= DEMAND_CORES
    assert "cold tier, serving the service" in d["cpu"].clamps
    # handed back (failback releases s1): held at the floor again
    asyncio.run(cold.loop.after_release(svc, "s1"))
    assert cold.cycle()["cpu"].predicted == ScalingConfig().cpu_floor_cores
