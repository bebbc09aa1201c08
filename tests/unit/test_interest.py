"""With the services divided among controller replicas ([cluster] shards), an agent sends heartbeats and
views only to the replicas that act for one of its services (apb.Interest), telemetry to every replica:
the controller's side decides and tells each stream as shards move; the agent's link stops and resumes,
sending its views again when a replica wants them back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from agentd.link import Backlog, ControllerLink
from controller.config import load_controller_config
from controller.event_log import EventLog
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry, AgentSession
from controller.store.sqlite import SqliteStore
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import agent_pb2_grpc as agrpc

CONFIG = """
listen = "127.0.0.1:7400"
[tls]
plaintext = true
[[host]]
name = "p1"
address = "127.0.0.1"
[[host]]
name = "s1"
address = "127.0.0.2"
[[host]]
name = "p2"
address = "127.0.0.3"
[[host]]
name = "s2"
address = "127.0.0.4"
[[host]]
name = "x"
address = "127.0.0.5"
[[service]]
name = "web"
primary = "p1"
shadows = ["s1"]
vip = "10.99.0.1/24"
[[service]]
name = "api"
primary = "p2"
shadows = ["s2"]
vip = "10.99.0.2/24"
"""


def told(s: AgentSession) -> list[str]:
    out = []
    while not s.outbox.empty():
        m = s.outbox.get_nowait()
        if m.HasField("interest"):
            i = m.interest
            out.append(("full" if i.full else "quiet") + (", no telemetry" if i.skip_telemetry else ""))
    return out


def test_the_controller_tells_each_stream_what_it_wants_of_it(tmp_path: Path) -> None:
    (tmp_path / "controller.toml").write_text(CONFIG)
    cfg = load_controller_config(tmp_path / "controller.toml")
    store = SqliteStore(tmp_path / "c.db")
    registry, events = AgentRegistry(), EventLog(store)
    tracked = {"web", "host x"}  # this replica acts for web's shard and x's
    heard: set[str] = set()  # and is next in line for no other
    orch = Orchestrator(
        cfg, store, registry, events, controller_lease_observer(cfg, store), not_leading=lambda s: "no"
    )
    loop = FailoverLoop(
        cfg,
        store,
        registry,
        events,
        orch.observer,
        orch,
        tracks=lambda s: s in tracked,
        hears=lambda s: s in heard,
    )

    def attach(host: str) -> AgentSession:
        s = AgentSession(host, f"{host}-1", "peer", apb.Hello(host=host), 0, 0)
        registry.attach(s)
        return s

    quiet, mute = ["quiet"], ["quiet, no telemetry"]
    sessions = {h: attach(h) for h in ("p1", "s1", "p2", "s2", "x")}
    loop.tick()
    assert {h: told(s) for h, s in sessions.items()} == {
        "p1": [], "s1": [], "x": [], "p2": mute, "s2": mute
    }  # fmt: skip
    loop.tick()  # nothing changed: nothing said again
    assert [told(s) for s in sessions.values()] == [[]] * 5
    # this replica becomes next in line for api's shard: it keeps api's hosts' history from now on
    heard.add("api")
    loop.tick()
    assert {h: told(s) for h, s in sessions.items()} == {
        "p1": [], "s1": [], "x": [], "p2": quiet, "s2": quiet
    }  # fmt: skip
    # what this replica knows of web while it acts for it: s1's view of p1, a renewal miss being counted
    loop.on_observation("s1", apb.Observation(service="web", target="p1", up=True, kind="health"))
    web = loop.services["web"]
    web.renewing_down_since_ms = 1
    # the shards move: web's and x's to another replica (this one not next in line), api's here
    tracked.clear()
    tracked.add("api")
    heard.clear()
    loop.tick()
    assert {h: told(s) for h, s in sessions.items()} == {
        "p1": mute, "s1": mute, "x": mute, "p2": ["full"], "s2": ["full"]
    }  # fmt: skip
    # and it is forgotten, not kept to be read stale should web's shard come back: s1 sends its views
    # again when told full, and a renewal miss is counted afresh
    assert loop.board.health("web", "p1") == {}
    assert web.renewing_down_since_ms is None
    # p1 reconnects: its new stream starts full, and is told at once
    sessions["p1"] = attach("p1")
    loop.tick()
    assert told(sessions["p1"]) == mute
    assert [told(s) for h, s in sessions.items() if h != "p1"] == [[]] * 4
    store.close()


class Replica(agrpc.AgentStreamServicer):
    """A replica that does not act for the agent's services, then does: Interest false, later true."""

    def __init__(self) -> None:
        self.got: list[tuple[float, apb.AgentMessage]] = []
        self.full_at = self.skip_at = 0.0

    async def Connect(
        self, request_iterator: AsyncIterator[apb.AgentMessage], context: Any
    ) -> AsyncIterator[apb.ControllerMessage]:
        loop = asyncio.get_running_loop()
        yield apb.ControllerMessage(welcome=apb.Welcome(controller_version="test"))
        yield apb.ControllerMessage(interest=apb.Interest(full=False, reason="other replicas act for web"))
        reader = asyncio.create_task(self._read(request_iterator))
        await asyncio.sleep(2.5)
        self.full_at = loop.time()
        yield apb.ControllerMessage(interest=apb.Interest(full=True, reason="this replica acts for web"))
        await asyncio.sleep(1.5)
        self.skip_at = loop.time()
        yield apb.ControllerMessage(
            interest=apb.Interest(full=False, skip_telemetry=True, reason="not next in line either")
        )
        await asyncio.sleep(2.0)
        reader.cancel()

    async def _read(self, it: AsyncIterator[apb.AgentMessage]) -> None:
        async for msg in it:
            self.got.append((asyncio.get_running_loop().time(), msg))


def test_the_agent_sends_heartbeats_and_views_only_while_wanted_telemetry_always() -> None:
    async def go() -> tuple[Replica, int]:
        replica = Replica()
        server = grpc.aio.server()
        agrpc.add_AgentStreamServicer_to_server(replica, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = ControllerLink(
            f"127.0.0.1:{port}", lambda: apb.Hello(host="s1"), Backlog(100), heartbeat_seconds=0.1
        )
        view = apb.Observation(service="web", target="p1", up=True, kind="health")
        link.greeting = lambda: [apb.AgentMessage(observation=view)]
        task = asyncio.create_task(link.run())
        try:
            await asyncio.sleep(1.0)
            for seq in range(1, 4):  # telemetry, and a changed view, while muted
                link.submit(apb.TelemetryBatch(seq=seq))
                link.send(apb.AgentMessage(observation=view))
                await asyncio.sleep(0.3)
            async with asyncio.timeout(10):
                while not replica.skip_at:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            for seq in range(4, 7):  # telemetry nobody there keeps
                link.submit(apb.TelemetryBatch(seq=seq))
                await asyncio.sleep(0.3)
        finally:
            task.cancel()
            await server.stop(None)
        return replica, len(link.backlog)

    r, backlog = asyncio.run(go())
    start = r.got[0][0]
    muted = [m for t, m in r.got if start + 0.5 < t < r.full_at]  # after the Interest arrived
    kinds = [m.WhichOneof("body") for m in muted]
    assert kinds.count("telemetry") == 3, kinds
    assert "heartbeat" not in kinds and "observation" not in kinds, kinds
    after = [m.WhichOneof("body") for t, m in r.got if r.full_at <= t < r.skip_at]
    assert after[0] == "observation", f"the views first, at once: {after[:5]}"
    assert after.count("heartbeat") >= 5, after
    skipped = [m.WhichOneof("body") for t, m in r.got if t > r.skip_at + 0.2]
    assert skipped == [], f"nothing once the replica wants no telemetry either: {skipped}"
    assert backlog == 0, "and nothing kept for it"
