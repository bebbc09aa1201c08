"""The scaling loop and `shadowctl backtest` are one path: fed the same recorded history, the limits the
controller's shadow holds step by step are the ones the backtest replays, for CPU and for memory, with the
controller's defaults and with a configuration that changes every parameter the path reads.

The store, the forecast model (the packaged ONNX file, through onnxruntime) and the scaling loop are real;
the shadow's agent is a stand-in registry that answers SetLimits with what the agent's own limit planner
(agentd.actuate.limits.plan) makes of them (the agent side is tested against cgroups in
tests/integration/test_limits_kernel.py and tests/vm)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agentd.actuate.limits import plan as agent_plan
from controller.config import ControllerConfig, ScalingConfig, ServiceConfig, StoreConfig
from controller.event_log import EventLog
from controller.registry import AgentRegistry
from controller.scaling import loop as scaling_loop
from controller.scaling.decision import ScalingDecision
from controller.scaling.loop import ScalingLoop, settle_seconds
from controller.store import SqliteStore
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb
from training.backtest import forecast_origins, replay_controller
from training.traces import Trace

STEP = 300
GIB = 1 << 30


class AgentLikeRegistry(AgentRegistry):
    """Answers SetLimits with the limits the agent would hold (quota in 1 % steps, memory in pages)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def call(self, host: str, cmd: apb.Command, timeout: float) -> apb.CommandResult:
        self.calls += 1
        want = agent_plan(cmd.set_limits, 0)
        limits = apb.LimitsApplied(
            workload=cmd.set_limits.workload, cpu_cores=want.cpu_cores, memory_bytes=want.memory_max
        )
        return apb.CommandResult(command_id=cmd.command_id, ok=True, limits=limits)


def recorded_history(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step end times, CPU cores and memory bytes of a primary with a daily cycle, noise and a burst."""
    rng = np.random.default_rng(seed)
    k = np.arange(steps)
    end = (1_790_000_000 // STEP) * STEP + (k + 1) * STEP
    day = np.sin(2 * math.pi * k / 288)
    cpu = np.maximum(0.05, 1.2 + 0.8 * day + rng.gamma(2, 0.08, steps))
    cpu[300:310] += 2.5  # a burst the forecast cannot know
    mem = (1.5 + 0.4 * day + rng.normal(0, 0.02, steps)) * GIB
    return end, cpu, np.round(mem)


RESTART_AT = 330  # a step more than a day in: the day-ago features are known


async def restarted_forecasts_the_same(running: ScalingLoop, now: int) -> None:
    """A controller started now on the same store (a restart, a package upgrade) has the history the running
    one was fed, seeded from the store, and forecasts from it what the running one forecast: the same
    curves, although the running engine detected the cycles at the top of the hour and the restarted one
    starts in the middle of it."""
    restarted = ScalingLoop(running.cfg, running.store, AgentRegistry(), running.events)
    # what calibration learned, the lower hold's clock and the step's rule: from the stored decisions
    restarted.restore(running.store.decisions(last=1))
    shadow = [k for k in running.states if k[0] == "s1"]  # (the I/O weight calibrates against itself)
    assert {k: restarted.states[k].log_price for k in shadow} == {
        k: running.states[k].log_price for k in shadow
    }
    assert restarted.changed_at == running.changed_at and restarted.changed_at
    assert restarted.changes == running.changes and any(restarted.changes.values())
    assert restarted.ruled_origin == running.ruled_origin
    assert {k: restarted.shadow_targets[k] for k in shadow} == {k: running.shadow_targets[k] for k in shadow}
    await restarted.forecast(now)
    origin = running.forecasts["web"].origin_s
    assert restarted.forecasts["web"].origin_s == origin
    day = running.history.batch(int(origin * 1000), ["p1/web"])
    assert not np.isnan(day.values).any(), "a day and more of history on the model's step"
    again = restarted.history.batch(int(origin * 1000), ["p1/web"])
    np.testing.assert_allclose(again.values, day.values, rtol=1e-12)
    assert origin % 3600, "a restart at the top of the hour would not show that the slots are the clock's"
    for resource in ("cpu", "memory"):
        np.testing.assert_allclose(
            restarted.forecasts["web"].curves[resource], running.forecasts["web"].curves[resource], rtol=1e-9
        )
    restarted.worker.close()


def controller_limits(
    tmp_path: Path,
    scaling: ScalingConfig,
    end: np.ndarray,
    cpu: np.ndarray,
    mem: np.ndarray,
    previews: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the scaling loop once per step over the recorded history; the limits the shadow held per step.
    `previews`: an operator's `shadowctl plan` (ScalingLoop.plan) at every pause of each cycle's planning."""
    store = SqliteStore(tmp_path / "c.db")
    for host in ("p1", "s1"):
        hello = apb.Hello(host=host, instance_id=f"{host}-1")
        hello.workloads.add(name="web", service="web")
        store.register_agent(hello, "peer", int(end[0]) * 1000)
    cfg = ControllerConfig(
        tls=TlsConfig(plaintext=True),
        store=StoreConfig(path=tmp_path / "c.db"),
        scaling=scaling,
        service=[ServiceConfig("web", "p1", ["s1"], vip="10.0.0.100/24")],
    )
    registry = AgentLikeRegistry()
    loop = ScalingLoop(cfg, store, registry, EventLog(store))
    held_cpu, held_mem = np.zeros(len(end)), np.zeros(len(end))
    if previews:
        planned, previewing = loop._plan_slices, [False]

        def previewed(now: int, out: list[ScalingDecision]) -> Iterator[None]:
            for _ in planned(now, out):
                if not previewing[0]:  # (the preview plans through this same method)
                    previewing[0] = True
                    loop.plan(now)
                    previewing[0] = False
                yield

        loop._plan_slices = previewed  # type: ignore[method-assign]

    def ingest(i: int) -> None:
        """Step i's sample arrives, as the agent stream delivers it: stored, then handed to the loop."""
        r = tpb.Resources(cpu_seconds=float(cpu[i]) * STEP, memory_bytes=int(mem[i]))
        s = tpb.WorkloadSample(
            workload="web",
            start_unix_ms=int(end[i] - STEP) * 1000,
            end_unix_ms=int(end[i]) * 1000,
            resources=r,
        )
        batch = apb.TelemetryBatch(seq=i + 1, samples=[s])
        if store.append_batch("p1", "p1-1", batch, int(end[i]) * 1000):
            loop.on_telemetry("p1", "p1-1", batch, int(end[i]) * 1000)

    async def run() -> None:
        for i in range(len(end) - 1):
            ingest(i)
            # the cycle just after step i ended, and one more within step i + 1 (the interval's wake-up):
            # the second must change nothing
            for now_s in (end[i] + settle_seconds(STEP) + 1, end[i] + STEP / 2):
                await loop.cycle(int(now_s * 1000))
                applied = loop.applied.get(("s1", "web"))
                if applied is not None:
                    held_cpu[i + 1], held_mem[i + 1] = applied.cpu_cores, applied.memory_bytes
            if i == RESTART_AT:
                await restarted_forecasts_the_same(loop, int(now_s * 1000))

    asyncio.run(run())
    loop.worker.close()
    store.close()
    assert registry.calls > 0
    return held_cpu, held_mem


def test_a_preview_between_planning_slices_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle plans in slices with the loop free between them; an operator's preview in a pause must not
    run the step's rules itself (the cycle would then hold, and the change would never be applied)."""
    monkeypatch.setattr(scaling_loop, "PLAN_SLICE_SECONDS", 0.0)  # a pause before every service
    end, cpu, mem = recorded_history(160, seed=4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet = controller_limits(tmp_path / "a", ScalingConfig(), end, cpu, mem)
    previewed = controller_limits(tmp_path / "b", ScalingConfig(), end, cpu, mem, previews=True)
    assert int(np.sum(np.diff(quiet[0][1:]) != 0)) >= 2  # limits moved: the comparison says something
    np.testing.assert_array_equal(previewed[0], quiet[0])
    np.testing.assert_array_equal(previewed[1], quiet[1])


@pytest.mark.parametrize(
    "scaling",
    [
        ScalingConfig(),
        ScalingConfig(
            target_coverage=0.95,
            up_threshold=1.1,
            up_factor=1.2,
            down_threshold=0.9,
            down_factor=0.3,
            cpu_floor_cores=0.5,
            cpu_ceiling_cores=3.0,
            memory_floor_bytes=GIB,
            memory_ceiling_bytes=3 * GIB,
            memory_guard=0.3,
            memory_lower_step=0.05,
            lower_hold_seconds=1800,
            max_changes_per_day=3,
        ),
    ],
    ids=["defaults", "every-parameter-changed"],
)
def test_the_backtest_replays_what_the_controller_does_step_by_step(
    tmp_path: Path, scaling: ScalingConfig
) -> None:
    end, cpu, mem = recorded_history(400, seed=4)
    held_cpu, held_mem = controller_limits(tmp_path, scaling, end, cpu, mem)
    model = ScalingLoop(
        ControllerConfig(tls=TlsConfig(plaintext=True), store=StoreConfig(path=tmp_path / "x.db")),
        SqliteStore(tmp_path / "x.db"),
        AgentRegistry(),
        EventLog(SqliteStore(tmp_path / "x.db")),
    ).engine.forecaster
    for resource, values, held in (("cpu", cpu, held_cpu), ("memory", mem, held_mem)):
        trace = Trace("recorded", end.astype(np.int64), values.astype(np.float64))
        curves = forecast_origins(model, trace)
        replay = replay_controller(trace.timestamps, trace.values, curves, model.quantiles, scaling, resource)
        # every step, exactly: same forecasts, same calibration, same rule, bounds and rounding
        np.testing.assert_allclose(held, replay.allocation, rtol=1e-9, err_msg=resource)
        changes = int(np.sum(np.diff(held[1:]) != 0))
        assert changes >= 3, f"{resource}: the limit moved {changes} times: the comparison proves little"
        if scaling.max_changes_per_day == 3 and resource == "cpu":
            free = replay_controller(
                trace.timestamps,
                trace.values,
                curves,
                model.quantiles,
                replace(scaling, max_changes_per_day=0),
            )
            assert not np.array_equal(free.allocation, held), "the change budget was never reached"
