"""The agent stream: hello, welcome, then telemetry in and acknowledgements out.

A bad batch is answered with a Reject naming the field; the stream (and every other agent's) carries on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from controller.config import ControllerConfig
from controller.registry import AgentRegistry, AgentSession
from controller.store import Store
from shadowplane import __version__
from shadowplane.clock import now_ms
from shadowplane.pki import Identity
from shadowplane.tls import peer_identity
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import agent_pb2_grpc as agrpc

log = logging.getLogger(__name__)

MAX_SAMPLES_PER_BATCH = 4096
MAX_HISTOGRAM_BUCKETS = 64


def check_hello(hello: apb.Hello, cfg: ControllerConfig) -> str | None:
    if not hello.host:
        return "hello.host is empty: set `host` in the agent's config"
    if not hello.instance_id:
        return "hello.instance_id is empty"
    allowed = {h.name for h in cfg.host}
    if allowed and hello.host not in allowed:
        return f"host {hello.host!r} is not in the controller's [[host]] list: add it there"
    names = [w.name for w in hello.workloads]
    if len(set(names)) != len(names):
        return "hello.workloads: duplicate workload names"
    return None


def check_agent_identity(who: Identity | None, host: str) -> str | None:
    """With TLS, an agent must present its own host's agent certificate."""
    if who is None:
        return None  # plaintext: nothing to check (the operator was warned)
    if who.role != "agent":
        return f"certificate of {who.name!r} has role {who.role!r}; agents need an agent certificate"
    if who.name != host:
        return f"certificate names host {who.name!r} but the agent says it is {host!r}"
    return None


def check_batch(hello: apb.Hello, batch: apb.TelemetryBatch) -> tuple[str, str] | None:
    """(field, reason) for a batch that must not be stored, or None."""
    if batch.seq == 0:
        return "seq", "must be >= 1"
    if len(batch.samples) > MAX_SAMPLES_PER_BATCH:
        return "samples", f"{len(batch.samples)} samples; at most {MAX_SAMPLES_PER_BATCH} per batch"
    known = {w.name for w in hello.workloads}
    for i, s in enumerate(batch.samples):
        where = f"samples[{i}]"
        if s.workload not in known:
            return f"{where}.workload", f"{s.workload!r} is not one of the workloads this agent announced"
        if s.end_unix_ms <= s.start_unix_ms or s.start_unix_ms <= 0:
            return (
                f"{where}.end_unix_ms",
                f"interval [{s.start_unix_ms}, {s.end_unix_ms}) is empty or negative",
            )
        for name, h in (
            ("syscalls.latency", s.syscalls.latency),
            ("block_io.latency", s.block_io.latency),
            ("tcp.srtt", s.tcp.srtt),
        ):
            if len(h.counts) > MAX_HISTOGRAM_BUCKETS:
                return f"{where}.{name}", f"{len(h.counts)} buckets; at most {MAX_HISTOGRAM_BUCKETS}"
        if s.resources.cpu_seconds < 0:
            return f"{where}.resources.cpu_seconds", "negative"
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
    ) -> None:
        self.cfg, self.store, self.registry, self.listener, self.clock = cfg, store, registry, listener, clock

    async def Connect(
        self,
        request_iterator: AsyncIterator[apb.AgentMessage],
        context: grpc.aio.ServicerContext[apb.AgentMessage, apb.ControllerMessage],
    ) -> AsyncIterator[apb.ControllerMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on the stream must be hello"
            )
            return
        hello = first.hello
        problem = check_hello(hello, self.cfg) or check_agent_identity(peer_identity(context), hello.host)
        if problem:
            log.warning("refused agent from %s: %s", context.peer(), problem)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
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
        inbox: asyncio.Queue[apb.AgentMessage | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for msg in request_iterator:
                    await inbox.put(msg)
            finally:
                await inbox.put(None)

        pump_task = asyncio.create_task(pump())
        try:
            while True:
                get = asyncio.create_task(inbox.get())
                out = asyncio.create_task(session.outbox.get())
                closed = asyncio.create_task(session.closed.wait())
                done, pending = await asyncio.wait({get, out, closed}, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                if closed in done:
                    return
                if out in done:
                    yield out.result()
                if get in done:
                    msg = get.result()
                    if msg is None:
                        return
                    reply = self._handle(session, msg)
                    if reply is not None:
                        yield reply
        finally:
            pump_task.cancel()
            self.registry.detach(session)
            if self.listener is not None and self.registry.get(session.host) is None:
                self.listener.on_disconnect(session.host)
            log.info("agent %s disconnected", hello.host)

    def _handle(self, session: AgentSession, msg: apb.AgentMessage) -> apb.ControllerMessage | None:
        now = self.clock()
        session.last_heard_ms = now
        kind = msg.WhichOneof("body")
        if kind == "telemetry":
            batch = msg.telemetry
            problem = check_batch(session.hello, batch)
            if problem:
                field, reason = problem
                log.warning("rejected batch %d from %s: %s: %s", batch.seq, session.host, field, reason)
                self.store.skip_batch(session.host, session.instance_id, batch.seq, now)
                return apb.ControllerMessage(reject=apb.Reject(seq=batch.seq, field=field, reason=reason))
            self.store.append_batch(session.host, session.instance_id, batch, now)
            session.capture = batch.capture
            return apb.ControllerMessage(ack=apb.TelemetryAck(seq=batch.seq))
        if kind == "heartbeat":
            return None
        if kind == "result":
            session.resolve(msg.result)
            return None
        if kind == "observation":
            if self.listener is not None:
                self.listener.on_observation(session.host, msg.observation)
            return None
        if kind == "lease_event":
            if self.listener is not None:
                self.listener.on_lease_event(session.host, msg.lease_event)
            return None
        if kind == "hello":
            return apb.ControllerMessage(
                reject=apb.Reject(field="hello", reason="hello is only valid as the first message")
            )
        return None
