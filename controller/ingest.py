"""The agent stream: hello, welcome, then telemetry in and acknowledgements out.

Every message is checked first (controller/stream_validation.py). A bad one (a batch with a NaN, an
observation of an unknown service, a result that answers no command) is answered with a Reject naming the
field and counted by host, kind and reason; it changes nothing, and the stream (and every other agent's)
carries on: the agent drops a rejected batch from its backlog instead of resending it, and its host never
looks down because of it (any message, even a refused one, shows the agent is alive).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from controller.config import ControllerConfig
from controller.registry import AgentRegistry, AgentSession
from controller.store import Store
from controller.stream_validation import Fleet, Problem, check_hello, check_message
from shadowplane import __version__
from shadowplane.clock import now_ms
from shadowplane.logs import Throttle
from shadowplane.pki import Identity
from shadowplane.tls import peer_identity
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import agent_pb2_grpc as agrpc

log = logging.getLogger(__name__)


def check_agent_identity(who: Identity | None, host: str) -> Problem | None:
    """With TLS, an agent must present its own host's agent certificate."""
    if who is None:
        return None  # plaintext: nothing to check (the operator was warned)
    if who.role != "agent":
        return Problem(
            "hello.host",
            "wrong_certificate",
            f"certificate of {who.name!r} has role {who.role!r}; agents need an agent certificate",
        )
    if who.name != host:
        return Problem(
            "hello.host",
            "wrong_certificate",
            f"certificate names host {who.name!r} but the agent says it is {host!r}",
        )
    return None


class StreamListener(Protocol):
    """Who else wants to hear what agents say (the failover loop)."""

    def on_observation(self, observer: str, o: apb.Observation) -> None: ...

    def on_lease_event(self, host: str, e: apb.LeaseEvent) -> None: ...

    def on_disconnect(self, host: str) -> None: ...


class AgentStreamService(agrpc.AgentStreamServicer):
    def __init__(
        self,
        cfg: ControllerConfig,
        store: Store,
        registry: AgentRegistry,
        listener: StreamListener | None = None,
        clock: Callable[[], int] = now_ms,
        on_telemetry: Callable[[str, str, apb.TelemetryBatch, int], None] | None = None,
    ) -> None:
        self.cfg, self.store, self.registry, self.listener, self.clock = cfg, store, registry, listener, clock
        # who keeps the forecast's history (the scaling loop): every batch the store accepted, once
        self.on_telemetry = on_telemetry
        self.fleet = Fleet.of(cfg)
        # One log line per host, kind and reason, then one a minute: a broken agent must not flood the log.
        self._throttle = Throttle(60.0)

    async def Connect(
        self,
        request_iterator: AsyncIterator[apb.AgentMessage],
        context: grpc.aio.ServicerContext[apb.AgentMessage, apb.ControllerMessage],
    ) -> AsyncIterator[apb.ControllerMessage]:
        try:
            first = await anext(aiter(request_iterator), None)
        except DecodeError as e:
            await self._undecodable("", context, e)
            return
        if first is None or first.WhichOneof("body") != "hello":
            kind = (first.WhichOneof("body") if first else None) or "none"
            self._count(
                "", kind, Problem("body", "unexpected", "the first message must be hello"), context.peer()
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on the stream must be hello"
            )
            return
        hello = first.hello
        problem = check_hello(hello, self.fleet, self.clock())
        status = grpc.StatusCode.INVALID_ARGUMENT
        if problem is None or problem.code == "unknown_host":
            status = grpc.StatusCode.PERMISSION_DENIED
            problem = problem or check_agent_identity(peer_identity(context), hello.host)
        if problem:
            # A refused stream names no host we know: its label is "" unless the name is one of the fleet's.
            host = hello.host if hello.host in self.fleet.hosts else ""
            self._count(host, "hello", problem, context.peer())
            await context.abort(status, f"{problem.field}: {problem.detail}")
            return
        now = self.clock()
        resume = self.store.register_agent(hello, context.peer(), now)
        session = AgentSession(hello.host, hello.instance_id, context.peer(), hello, now, now, hello.capture)
        self.registry.attach(session)
        log.info(
            "agent %s connected from %s (instance %s, resume after %d)",
            hello.host,
            context.peer(),
            hello.instance_id[:8],
            resume,
        )
        yield apb.ControllerMessage(
            welcome=apb.Welcome(controller_version=__version__, resume_after_seq=resume)
        )
        # One queue for what the agent sends, what the controller sends it, and the session's end: a
        # message costs one wake-up (a thousand agents' heartbeats are a thousand messages a second, and
        # three tasks per message, as waiting on three sources took, was a tenth of a core of them).
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def inbound() -> None:
            try:
                async for msg in request_iterator:
                    events.put_nowait(("in", msg))
            except DecodeError as e:  # gRPC ends the call on bytes that do not parse: say why, then end
                events.put_nowait(("in", e))
            finally:
                events.put_nowait(("in", None))

        async def outbound() -> None:
            while True:
                events.put_nowait(("out", await session.outbox.get()))

        async def closing() -> None:
            await session.closed.wait()
            events.put_nowait(("closed", None))

        pumps = [asyncio.create_task(f()) for f in (inbound, outbound, closing)]
        try:
            while True:
                source, item = await events.get()
                if source == "closed":
                    return
                if source == "out":
                    yield item
                    continue
                if item is None:
                    return
                if isinstance(item, DecodeError):
                    await self._undecodable(session.host, context, item)
                    return
                reply = self._handle(session, item)
                if reply is not None:
                    yield reply
        finally:
            for t in pumps:  # the client went away while we waited: leave no task behind
                t.cancel()
            self.registry.detach(session)
            if self.listener is not None and self.registry.get(session.host) is None:
                self.listener.on_disconnect(session.host)
            log.info("agent %s disconnected", hello.host)

    async def _undecodable(
        self,
        host: str,
        context: grpc.aio.ServicerContext[apb.AgentMessage, apb.ControllerMessage],
        e: DecodeError,
    ) -> None:
        p = Problem("body", "undecodable", f"not an AgentMessage ({e}): is the peer a Shadowplane agent?")
        self._count(host, "undecodable", p, host or context.peer())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{p.field}: {p.detail}")

    def _count(self, host: str, kind: str, p: Problem, who: str) -> None:
        view = self.registry.rejections.add(host, kind, p, self.clock())
        quiet = self._throttle((host, kind, p.code))
        if quiet is not None:
            log.warning(
                "refused %s from %s: %s: %s%s (%d so far)",
                kind,
                who,
                p.field,
                p.detail,
                f"; {quiet} more not logged" if quiet else "",
                view.count,
            )

    def _handle(self, session: AgentSession, msg: apb.AgentMessage) -> apb.ControllerMessage | None:
        now = self.clock()
        session.last_heard_ms = now  # any message, even one refused below, shows the agent is alive
        kind, problem = check_message(msg, session.hello, self.fleet, now)
        reply = None
        try:
            if kind == "result":  # even a malformed result ends the wait of the command it names, saying why
                problem = self.registry.resolve(session, msg.result, problem)
            elif problem is None:
                reply, problem = self._apply(session, kind, msg, now)
        except sqlite3.OperationalError:
            raise  # the store cannot write (disk full, locked): end the stream, the agent resends later
        except Exception as e:  # a check missed something: refuse this message, keep the stream
            log.exception("%s from %s passed its checks but failed; refused it", kind, session.host)
            problem = Problem(kind, "internal", f"the controller failed on it: {type(e).__name__}: {e}")
        if problem is None:
            return reply
        self._count(session.host, kind, problem, session.host)
        return apb.ControllerMessage(
            reject=apb.Reject(
                seq=msg.telemetry.seq if kind == "telemetry" else 0,
                field=problem.field,
                reason=problem.detail,
                kind=kind,
                reason_code=problem.code,
            )
        )

    def _apply(
        self, session: AgentSession, kind: str, msg: apb.AgentMessage, now: int
    ) -> tuple[apb.ControllerMessage | None, Problem | None]:
        """Act on a message that passed its checks: (the reply, or a problem found only now)."""
        if kind == "telemetry":
            batch = msg.telemetry
            try:
                new = self.store.append_batch(session.host, session.instance_id, batch, now)
            except (sqlite3.IntegrityError, OverflowError, ValueError) as e:  # a value the checks let through
                return None, Problem("samples", "store_refused", f"the store refused the batch: {e}")
            if new and self.on_telemetry is not None:
                self.on_telemetry(session.host, session.instance_id, batch, now)
            session.capture = batch.capture
            return apb.ControllerMessage(ack=apb.TelemetryAck(seq=batch.seq)), None
        if kind == "observation" and self.listener is not None:
            if self.registry.get(session.host) is not session:
                # a replaced stream's last words: older than the views its successor's greeting gave
                return None, None
            self.listener.on_observation(session.host, msg.observation)
        if kind == "lease_event" and self.listener is not None:
            self.listener.on_lease_event(session.host, msg.lease_event)
        return None, None  # a heartbeat, or nobody listening
