"""An observer's views reach the controller on change and once on every new stream, not repeated every second
(at fleet sizes the repeats were most of the controller's work): a controller that restarts, or a replica
the agent reconnects to, still learns every view at once."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from agentd.failover import ObserverRole
from agentd.link import Backlog, ControllerLink
from shadowplane.healthcheck import ExecCheckConfig
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import agent_pb2_grpc as agrpc


def watch() -> apb.Watch:
    check = apb.HealthCheck(
        service="web", target="p1", address="10.9.9.9", kind="exec", port=80, check="ok",
        interval_ms=50, timeout_ms=5000, fall=1, rise=1,
    )  # fmt: skip
    return apb.Watch(checks=[check], observed_services=["web"], lease_ms=1000)


def health(sent: list[apb.AgentMessage]) -> list[apb.Observation]:
    return [m.observation for m in sent if m.HasField("observation") and m.observation.kind == "health"]


def test_a_steady_view_is_sent_once_and_held_for_the_next_stream(tmp_path: Path) -> None:
    sent: list[apb.AgentMessage] = []
    role = ObserverRole("s1", sent.append, {"ok": ExecCheckConfig([sys.executable, "-c", "pass"])})

    async def go() -> list[apb.AgentMessage]:
        role.watch(watch())
        try:
            async with asyncio.timeout(30):
                while not health(sent):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(1.5)  # the check ran about 30 more times, all up
            return role.views()
        finally:
            await role.close()

    views = asyncio.run(go())
    assert len(health(sent)) == 1, "an unchanged view was sent again"
    assert [m.observation.target for m in views] == ["p1"] and views[0].observation.up


class Controller(agrpc.AgentStreamServicer):
    """The controller's side of the stream, recording each session; it ends the first one (a restart)."""

    def __init__(self) -> None:
        self.sessions: list[list[apb.AgentMessage]] = []

    async def Connect(
        self, request_iterator: AsyncIterator[apb.AgentMessage], context: Any
    ) -> AsyncIterator[apb.ControllerMessage]:
        got: list[apb.AgentMessage] = []
        self.sessions.append(got)
        first = len(self.sessions) == 1
        yield apb.ControllerMessage(welcome=apb.Welcome(controller_version="test"))
        async for msg in request_iterator:
            got.append(msg)
            if first and msg.HasField("heartbeat"):
                return  # the controller goes away (its first heartbeat comes after the greeting)


def test_every_new_stream_starts_with_the_views_the_observer_holds() -> None:
    async def go() -> Controller:
        controller = Controller()
        server = grpc.aio.server()
        agrpc.add_AgentStreamServicer_to_server(controller, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = ControllerLink(
            f"127.0.0.1:{port}", lambda: apb.Hello(host="s1"), Backlog(10), reconnect_max_seconds=0.2
        )
        # more views than the link's outbox holds (an observer of hundreds of services): all must arrive
        link.greeting = lambda: [
            apb.AgentMessage(
                observation=apb.Observation(service=f"svc{i}", target="p1", up=True, kind="health")
            )
            for i in range(1500)
        ]
        # queued while no stream was up, and older than the greeting's word on the same view
        link.send(apb.AgentMessage(observation=apb.Observation(service="svc0", target="p1", up=False)))
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(30):
                # until the second stream has had its greeting (1,500 views take a while on a busy machine)
                while (
                    len(controller.sessions) < 2
                    or sum(m.HasField("observation") for m in controller.sessions[1]) < 1500
                ):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # anything more that would come
        finally:
            task.cancel()
            await server.stop(None)
        return controller

    controller = asyncio.run(go())
    for got in controller.sessions[:2]:
        obs = [m.observation for m in got if m.HasField("observation")]
        assert [(o.service, o.up) for o in obs] == [(f"svc{i}", True) for i in range(1500)]


def test_a_new_holder_is_news_even_when_both_renew() -> None:
    """A planned move: the new owner's first renewal lands before the observer looks again, so its lease
    view goes from "p1 renews token 1" to "s1 renews token 2" without a moment of "not renewing"."""
    sent: list[apb.AgentMessage] = []
    role = ObserverRole("o1", sent.append)
    role.leases.started_at -= 100  # past the start-up grace

    async def go() -> None:
        role.watch(apb.Watch(observed_services=["web"], lease_ms=1000))
        role.leases.vote("web", 1, "p1")
        role.leases.renew("web", 1, "p1")
        await asyncio.sleep(0.2)
        role.leases.vote("web", 2, "s1")
        role.leases.renew("web", 2, "s1")
        for _ in range(5):
            await asyncio.sleep(0.1)
            role.leases.renew("web", 2, "s1")
        await role.close()

    asyncio.run(go())
    lease = [(m.observation.target, m.observation.token, m.observation.up) for m in sent]
    assert lease == [("p1", 1, True), ("s1", 2, True)]
