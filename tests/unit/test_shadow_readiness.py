"""The controller calls a shadow ready only while its kernel holds the limits it applied: judged each cycle
from the newest stored sample (each carries the limits its agent read back), with events when that changes,
and the limits sent again when they were lost. The store and the event log are real; the agent's answers
come from a stand-in registry (an agent applying limits needs a shadow host and a connected stream; the
agent side is tested in tests/integration/test_limits_kernel.py and tests/vm)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.config import ControllerConfig
from controller.event_log import EventLog
from controller.registry import AgentRegistry
from controller.scaling.decision import ScalingDecision
from controller.scaling.loop import ScalingLoop
from controller.store import SqliteStore
from shadowplane.clock import now_ms
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

GIB = 1 << 30


class AnsweringRegistry(AgentRegistry):
    """Answers SetLimits as an agent would whose kernel then holds 1.5 cores and 1 GiB."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[apb.SetLimits] = []

    async def call(self, host: str, cmd: apb.Command, timeout: float) -> apb.CommandResult:
        self.sent.append(cmd.set_limits)
        limits = apb.LimitsApplied(workload=cmd.set_limits.workload, cpu_cores=1.5, memory_bytes=GIB)
        return apb.CommandResult(command_id=cmd.command_id, ok=True, limits=limits)


def unchanged(resource: str, value: float) -> ScalingDecision:
    return ScalingDecision(
        unix_ms=now_ms(),
        service="web",
        host="s1",
        workload="web",
        resource=resource,
        demand_from="p1/web",
        forecast={},
        predicted=value,
        old=value,
        new=value,
        branch="hold",
    )


def test_readiness_follows_what_the_kernel_holds(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    registry = AnsweringRegistry()
    loop = ScalingLoop(ControllerConfig(tls=TlsConfig(plaintext=True)), store, registry, EventLog(store))
    store.register_agent(apb.Hello(host="s1", instance_id="i1"), "peer", now_ms())
    key, decisions = ("s1", "web"), [unchanged("cpu", 1.5), unchanged("memory", GIB)]
    seq = 0

    def sampled(cpu: float, memory: int, problem: str = "", reapplied: int = 0) -> None:
        nonlocal seq
        seq += 1
        end = now_ms() + seq  # after the limits were applied
        r = tpb.Resources(
            cpu_limit_cores=cpu, memory_limit_bytes=memory, limits_problem=problem, limits_reapplied=reapplied
        )
        s = tpb.WorkloadSample(workload="web", start_unix_ms=end - 1000, end_unix_ms=end, resources=r)
        store.append_batch("s1", "i1", apb.TelemetryBatch(seq=seq, samples=[s]), now_ms())

    def cycle() -> list[str]:
        return [d.result for d in asyncio.run(loop._apply(key, decisions))]

    assert cycle() == ["applied", "applied"] and len(registry.sent) == 1  # never applied: sent
    assert loop.readiness[key].ready
    sampled(1.5, GIB)
    assert cycle() == ["unchanged", "unchanged"] and len(registry.sent) == 1
    assert loop.readiness[key].ready
    # reset and written again by the agent between two samples: still ready, and an event says so
    sampled(1.5, GIB, reapplied=1)
    assert cycle() == ["unchanged", "unchanged"] and loop.readiness[key].ready
    (ev,) = [e for e in store.events() if e.kind == "shadow-limits-reapplied"]
    assert ev.host == "s1" and ev.reason == (
        "web: the kernel had lost its limits (reset e.g. by `systemctl daemon-reload`); the agent applied "
        "them again (1 time)"
    )

    # The kernel lost them (e.g. a daemon-reload) and the agent could not write them again: not ready,
    # said in an event; sent again; held again, said too.
    sampled(
        0.0,
        0,
        reapplied=1,
        problem="cpu.max: cpu controller not enabled for /sys/fs/cgroup/system.slice: ...",
    )
    assert cycle() == ["applied", "applied"] and len(registry.sent) == 2
    events = [(e.kind, e.reason) for e in store.events() if e.kind in ("shadow-ready", "shadow-not-ready")]
    assert events == [
        (
            "shadow-not-ready",
            "web: the kernel does not hold the limits: cpu.max: cpu controller not enabled for "
            "/sys/fs/cgroup/system.slice: ...",
        ),
        ("shadow-ready", "web: limits applied again"),
    ]
    assert loop.readiness[key].ready
