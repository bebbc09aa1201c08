"""Which agents are connected right now, the way to ask them to do things, and what their streams had
refused.

Command ids carry the controller's incarnation (random per start, `<incarnation>-<n>`), and results echo it:
a late result meant for an earlier controller, or for a command that already timed out, is refused rather
than taken for another command; a result whose detail does not answer its command (a vote answered with an
address state) is refused too, and its caller gets a `CommandError` saying so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
from dataclasses import dataclass, field

from controller.status import AgentView, CaptureFeatureView, CaptureView, RejectedView
from controller.stream_validation import Problem, check_answer
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)

MAX_UNAWAITED = 256  # fire-and-forget commands (Watch) remembered per session until their result comes
MAX_REJECTION_KEYS = 10_000  # (host, kind, reason) series: hostile input must not grow them without bound


class CommandError(RuntimeError):
    pass


def new_incarnation() -> str:
    """Unique per controller start (64 random bits)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Pending:
    command: apb.Command
    future: asyncio.Future[apb.CommandResult]


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
    pending: dict[str, Pending] = field(default_factory=dict)
    # Commands sent without waiting (Watch): their results are still checked, then forgotten.
    unawaited: collections.OrderedDict[str, apb.Command] = field(default_factory=collections.OrderedDict)
    # Whether the agent sends this replica heartbeats and views (apb.Interest): a new stream starts full
    full: bool = True
    skip_telemetry: bool = False  # ... and whether it sends no telemetry either

    def fail_pending(self, why: str) -> None:
        for p in self.pending.values():
            if not p.future.done():
                p.future.set_exception(CommandError(why))
        self.pending.clear()


class Rejections:
    """Messages refused on agent streams, by (host, kind, reason code): counters that outlive streams."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], RejectedView] = {}

    def add(self, host: str, kind: str, p: Problem, now_ms: int) -> RejectedView:
        key = (host, kind, p.code)
        if key not in self._seen and len(self._seen) >= MAX_REJECTION_KEYS:
            key = ("", kind, p.code)  # beyond the bound, hostile names fold into one series
        old = self._seen.get(key)
        view = RejectedView(*key, (old.count if old else 0) + 1, p.field, p.detail, now_ms)
        self._seen[key] = view
        return view

    def views(self) -> tuple[RejectedView, ...]:
        return tuple(self._seen[k] for k in sorted(self._seen))


class AgentRegistry:
    def __init__(self, incarnation: str | None = None) -> None:
        self.incarnation = incarnation or new_incarnation()
        self._sessions: dict[str, AgentSession] = {}
        self._ids = itertools.count(1)
        self.on_change: list[asyncio.Event] = []
        self.version = 0  # grows with every stream attached or detached
        self.rejections = Rejections()

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
        self.version += 1
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
                    tuple(CaptureFeatureView(f.name, f.captured, f.detail) for f in s.capture.features),
                ),
            )
            for s in self._sessions.values()
        )

    def alive(self, now_ms: int, silent_ms: int) -> frozenset[str]:
        """Hosts whose stream is up AND that spoke within `silent_ms`: a cut-off host's stream can look
        open for many seconds before TCP gives up on it."""
        return frozenset(h for h, s in self._sessions.items() if now_ms - s.last_heard_ms <= silent_ms)

    def is_alive(self, host: str, now_ms: int, silent_ms: int) -> bool:
        """`host in alive(now_ms, silent_ms)` without a walk of every host (a transition asks it of one)."""
        s = self._sessions.get(host)
        return s is not None and now_ms - s.last_heard_ms <= silent_ms

    def _number(self, cmd: apb.Command) -> None:
        cmd.command_id = f"{self.incarnation}-{next(self._ids)}"
        cmd.incarnation = self.incarnation

    def resolve(
        self, s: AgentSession, r: apb.CommandResult, invalid: Problem | None = None
    ) -> Problem | None:
        """Hand a result to the command waiting for it; the problem if it answers none, or wrongly, or is
        `invalid` (its own values are bad): then the waiting caller fails at once with the reason."""
        if invalid is not None:
            s.unawaited.pop(r.command_id, None)
            bad = s.pending.pop(r.command_id, None)
            if bad is not None and not bad.future.done():
                bad.future.set_exception(
                    CommandError(
                        f"agent {s.host} answered command {r.command_id}: {invalid.field}: {invalid.detail}"
                    )
                )
            return invalid
        # An agent older than incarnations echoes none: the id it echoes carries one too.
        incarnation = r.incarnation or r.command_id.rpartition("-")[0]
        if incarnation != self.incarnation:
            return Problem(
                "result.incarnation",
                "stale_incarnation",
                f"result of command {r.command_id[:80]!r} from controller incarnation {incarnation[:80]!r}; "
                f"this controller is {self.incarnation!r}: a late answer to an earlier controller",
            )
        pending = s.pending.pop(r.command_id, None)
        cmd = pending.command if pending else s.unawaited.pop(r.command_id, None)
        if cmd is None:
            return Problem(
                "result.command_id",
                "unknown_command",
                f"no command {r.command_id[:80]!r} is waiting for a result (it timed out, or was never sent)",
            )
        problem = check_answer(cmd, r)
        if pending is not None and not pending.future.done():
            if problem is None:
                pending.future.set_result(r)
            else:
                pending.future.set_exception(
                    CommandError(f"agent {s.host} answered command {r.command_id} wrongly: {problem.detail}")
                )
        return problem

    async def call(self, host: str, cmd: apb.Command, timeout: float) -> apb.CommandResult:
        """Send a command on the host's stream and wait for its result."""
        s = self._sessions.get(host)
        if s is None:
            raise CommandError(f"agent {host} is not connected")
        self._number(cmd)
        fut: asyncio.Future[apb.CommandResult] = asyncio.get_running_loop().create_future()
        s.pending[cmd.command_id] = Pending(cmd, fut)
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
        self._number(cmd)
        s.unawaited[cmd.command_id] = cmd
        while len(s.unawaited) > MAX_UNAWAITED:
            s.unawaited.popitem(last=False)
        with contextlib.suppress(asyncio.QueueFull):
            s.outbox.put_nowait(apb.ControllerMessage(command=cmd))
        return True
