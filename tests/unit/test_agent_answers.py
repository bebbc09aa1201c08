"""The agent's real command handler answers each command the way the controller's type check expects, and
echoes the controller's incarnation (so a late answer is never taken for another controller's command)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentd.cgroupfs import CgroupLayout
from agentd.commands import CommandHandler
from agentd.config import AgentConfig
from agentd.failover import ObserverRole
from controller.stream_validation import check_answer, check_result
from shadowplane.v1 import agent_pb2 as apb

COMMANDS = [
    apb.Command(watch=apb.Watch(observed_services=["web"], lease_ms=500)),
    apb.Command(vote=apb.Vote(service="web", token=3, candidate="s1")),
    apb.Command(vote=apb.Vote(service="web", token=2, candidate="s2")),  # refused: token 3 was promised
    apb.Command(release=apb.Release(service="web", token=3)),  # holds nothing: says so
    apb.Command(run_hook=apb.RunHook(service="web", phase="before-takeover", timeout_ms=1000)),
    apb.Command(set_limits=apb.SetLimits(workload="nope", cpu_cores=1.0)),  # fails, saying why
]


@pytest.mark.parametrize("incarnation", ["5f3a9c0e12ab44d1", ""])
def test_every_answer_passes_the_controllers_check(tmp_path: Path, incarnation: str) -> None:
    async def run() -> list[tuple[apb.Command, apb.CommandResult]]:
        cfg = AgentConfig(host="s1", hooks_dir=tmp_path)
        observer = ObserverRole("s1", report=lambda m: None)
        layout = CgroupLayout(tmp_path, "v2", tmp_path)  # set_limits names no workload: nothing is read
        handler = CommandHandler(cfg, layout, observer, report=lambda m: None)
        out = []
        try:
            for i, cmd in enumerate(COMMANDS):
                cmd.command_id, cmd.incarnation = f"{incarnation}-{i}", incarnation
                out.append((cmd, await handler(cmd)))
        finally:
            await handler.close()
            await observer.close()
        return out

    for cmd, r in asyncio.run(run()):
        assert (r.command_id, r.incarnation) == (cmd.command_id, incarnation)
        assert check_result(r) is None and check_answer(cmd, r) is None, (cmd, r)
