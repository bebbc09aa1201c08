"""Which agents are connected right now, and the way to send them commands."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentSession:
    host: str
    instance_id: str
    peer: str
    hello: apb.Hello
    connected_ms: int
    last_heard_ms: int
    capture: tpb.CaptureStatus = field(default_factory=tpb.CaptureStatus)
    outbox: asyncio.Queue[apb.ControllerMessage] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class AgentRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}

    def attach(self, s: AgentSession) -> None:
        old = self._sessions.get(s.host)
        if old is not None:
            # One agent per host: a newer stream (a restart, a reconnect after a half-open TCP) replaces it.
            log.info(
                "host %s reconnected from %s; closing its previous stream from %s", s.host, s.peer, old.peer
            )
            old.closed.set()
        self._sessions[s.host] = s

    def detach(self, s: AgentSession) -> None:
        if self._sessions.get(s.host) is s:
            del self._sessions[s.host]

    def get(self, host: str) -> AgentSession | None:
        return self._sessions.get(host)

    def connected(self) -> dict[str, AgentSession]:
        return dict(self._sessions)
