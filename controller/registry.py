"""Which agents are connected right now, and the way to ask them to do things."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field

from controller.status import AgentView, CaptureView
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)


class CommandError(RuntimeError):
    pass


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
    pending: dict[str, asyncio.Future[apb.CommandResult]] = field(default_factory=dict)

    def resolve(self, result: apb.CommandResult) -> None:
        fut = self.pending.pop(result.command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def fail_pending(self, why: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(CommandError(why))
        self.pending.clear()


class AgentRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        self._ids = itertools.count(1)
        self.on_change: list[asyncio.Event] = []

    def attach(self, s: AgentSession) -> None:
        old = self._sessions.get(s.host)
        if old is not None:
            # One agent per host: a newer stream (a restart, a reconnect after a half-open TCP) replaces it.
            log.info(
                "host %s reconnected from %s; closing its previous stream from %s", s.host, s.peer, old.peer
            )
            old.closed.set()
            old.fail_pending("agent reconnected")
        self._sessions[s.host] = s
        self._changed()

    def detach(self, s: AgentSession) -> None:
        if self._sessions.get(s.host) is s:
            del self._sessions[s.host]
            self._changed()
        s.fail_pending(f"agent {s.host} disconnected")

    def _changed(self) -> None:
        for ev in self.on_change:
            ev.set()

    def get(self, host: str) -> AgentSession | None:
        return self._sessions.get(host)

    def connected(self) -> dict[str, AgentSession]:
        return dict(self._sessions)

    def views(self) -> tuple[AgentView, ...]:
        """The connected agents for the status view: when each was last heard, what it says of its capture."""
        return tuple(
            AgentView(
                s.host,
                s.instance_id,
                s.last_heard_ms,
                CaptureView(
                    s.capture.bpf_active,
                    s.capture.bpf_unavailable_reason,
                    dict(s.capture.dropped_events),
                    s.capture.telemetry_batches_dropped,
                ),
            )
            for s in self._sessions.values()
        )

    def alive(self, now_ms: int, silent_ms: int) -> frozenset[str]:
        """Hosts whose stream is up AND that spoke within `silent_ms`: a cut-off host's stream can look
        open for many seconds before TCP gives up on it."""
        return frozenset(h for h, s in self._sessions.items() if now_ms - s.last_heard_ms <= silent_ms)

    async def call(self, host: str, cmd: apb.Command, timeout: float) -> apb.CommandResult:
        """Send a command on the host's stream and wait for its result."""
        s = self._sessions.get(host)
        if s is None:
            raise CommandError(f"agent {host} is not connected")
        cmd.command_id = f"c{next(self._ids)}"
        fut: asyncio.Future[apb.CommandResult] = asyncio.get_running_loop().create_future()
        s.pending[cmd.command_id] = fut
        await s.outbox.put(apb.ControllerMessage(command=cmd))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CommandError(f"agent {host} did not answer within {timeout:.2f} s") from None
        finally:
            s.pending.pop(cmd.command_id, None)

    def send(self, host: str, cmd: apb.Command) -> bool:
        """Fire and forget (e.g. Watch); False if the host is not connected."""
        s = self._sessions.get(host)
        if s is None:
            return False
        cmd.command_id = f"c{next(self._ids)}"
        with contextlib.suppress(asyncio.QueueFull):
            s.outbox.put_nowait(apb.ControllerMessage(command=cmd))
        return True
