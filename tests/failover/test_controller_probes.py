"""The controller probes a service's hosts only where it judges their health: where its observers are
agent hosts, their views decide and a probe of the controller's would never be asked (at fleet sizes,
thousands of TCP connections a second for nothing)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from controller.config import ControllerConfig, HostEntry, ServiceConfig
from controller.event_log import EventLog
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry
from controller.store.sqlite import SqliteStore
from shadowplane.config import build


async def _run_failover_loop(seconds: float, cfg: ControllerConfig, tmp: Path) -> None:
    store = SqliteStore(tmp / "c.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    loop = FailoverLoop(
        cfg, store, registry, events, observer, Orchestrator(cfg, store, registry, events, observer)
    )
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    store.close()


def test_only_services_the_controller_observes_are_probed_by_it(tmp_path: Path) -> None:
    accepted = {"controller-judged": 0, "agent-judged": 0}

    async def main() -> None:
        servers, ports = [], {}
        for name in accepted:

            async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = name) -> None:
                accepted[name] += 1
                w.close()

            srv = await asyncio.start_server(accept, "127.0.0.1", 0)
            servers.append(srv)
            ports[name] = srv.sockets[0].getsockname()[1]
        hosts = [HostEntry(h, address="127.0.0.1") for h in ("p1", "s1", "p2", "s2", "o1", "o2", "o3")]
        services = [
            build(
                ServiceConfig,
                {
                    "name": "controller-judged",  # observers unset: the controller and the shadow
                    "primary": "p1", "shadows": ["s1"], "vip": "10.0.0.100/24",
                    "health": {"kind": "tcp", "port": ports["controller-judged"], "interval_seconds": 0.1},
                },
            ),
            build(
                ServiceConfig,
                {
                    "name": "agent-judged",
                    "primary": "p2", "shadows": ["s2"], "vip": "10.0.0.101/24",
                    "observers": ["o1", "o2", "o3"],
                    "health": {"kind": "tcp", "port": ports["agent-judged"], "interval_seconds": 0.1},
                },
            ),
        ]  # fmt: skip
        try:
            await _run_failover_loop(1.0, ControllerConfig(host=hosts, service=services), tmp_path)
        finally:
            for srv in servers:
                srv.close()

    asyncio.run(main())
    assert accepted["controller-judged"] >= 4, accepted  # both hosts, every 0.1 s for 1 s
    assert accepted["agent-judged"] == 0, accepted
