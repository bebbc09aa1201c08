"""The agent's one long-lived stream to the controller.

Telemetry batches carry a sequence number per agent instance. Each batch stays in a bounded backlog until
the controller acknowledges it (cumulatively) or rejects it, so a controller restart or a network cut loses
nothing the backlog can hold, and the controller's `resume_after_seq` plus its own duplicate check mean
nothing is stored twice. A batch the controller rejects (it names the field and the reason) is dropped and
counted, never resent: resending it would be refused again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from shadowplane.logs import Throttle
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import agent_pb2_grpc as agrpc

log = logging.getLogger(__name__)

CommandHandler = Callable[[apb.Command], Awaitable[apb.CommandResult]]
# What a controller hears first on each new stream: the agent's state that is sent on change only (views)
Greeting = Callable[[], list[apb.AgentMessage]]


class Backlog:
    """Unacknowledged telemetry batches, oldest first, at most `max_batches` of them."""

    def __init__(self, max_batches: int) -> None:
        self._q: collections.deque[apb.TelemetryBatch] = collections.deque()
        self.max_batches = max_batches
        self.dropped_total = 0

    def add(self, batch: apb.TelemetryBatch) -> None:
        self._q.append(batch)
        while len(self._q) > self.max_batches:
            self._q.popleft()
            self.dropped_total += 1

    def ack(self, seq: int) -> None:
        while self._q and self._q[0].seq <= seq:
            self._q.popleft()

    def drop(self, seq: int) -> None:
        """Forget one batch the controller will never take."""
        self._q = collections.deque(b for b in self._q if b.seq != seq)

    def after(self, seq: int) -> list[apb.TelemetryBatch]:
        return [b for b in self._q if b.seq > seq]

    def __len__(self) -> int:
        return len(self._q)


@dataclass
class LinkState:
    connected: bool = False
    sessions: int = 0
    last_error: str = ""
    # Messages the controller refused, by (kind, reason code): "telemetry" ones were dropped from the backlog.
    rejected: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    last_rejected: str = ""  # the latest: kind, field and reason


class ControllerLink:
    def __init__(
        self,
        target: str,
        hello: Callable[[], apb.Hello],
        backlog: Backlog,
        heartbeat_seconds: float = 1.0,
        reconnect_max_seconds: float = 5.0,
        on_command: CommandHandler | None = None,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self.target = target
        self.hello = hello
        self.backlog = backlog
        self.heartbeat_seconds = heartbeat_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.on_command = on_command
        self.greeting: Greeting | None = None
        self.channel_factory = channel_factory or (
            lambda t: grpc.aio.insecure_channel(t, options=CHANNEL_OPTIONS)
        )
        self.state = LinkState()
        self._wake = asyncio.Event()
        # Results, observations and lease events: useful only to a live session, so bounded and lossy.
        self._outbox: collections.deque[apb.AgentMessage] = collections.deque(maxlen=1000)
        self._overflowed = False  # the outbox dropped a message: the greeting is due again
        # Does this controller replica want heartbeats and views from this host (Interest)? Sharded replicas
        # want them only while they act for one of its services; each stream starts full.
        self.full = True
        self.skip_telemetry = False  # a replica that neither acts for nor is next in line for our services
        self._regreet = False  # full again: the views are due
        self._commands: set[asyncio.Task[None]] = set()
        # Every rejected batch is logged; other rejections of one kind and reason once a minute at most.
        self._throttle = Throttle(60.0)

    def submit(self, batch: apb.TelemetryBatch) -> None:
        if self.skip_telemetry and self.state.connected:
            return  # that replica keeps no history of this host (it would forecast nothing from it)
        self.backlog.add(batch)
        self._wake.set()

    def send(self, msg: apb.AgentMessage) -> None:
        """Queue a message for the current session (results, observations); dropped if none comes."""
        if len(self._outbox) == self._outbox.maxlen:
            self._overflowed = True
        self._outbox.append(msg)
        self._wake.set()

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._session()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self.state.last_error = f"{e.code().name}: {e.details()}"
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(self.backlog):
                    # The controller refuses a message this large: resending it would fail forever.
                    head = self.backlog.after(0)[0]
                    log.error("controller refused telemetry batch %d as too large; dropping it", head.seq)
                    self.backlog.drop(head.seq)
                    self.backlog.dropped_total += 1
            except Exception as e:  # the link must survive anything one session throws
                self.state.last_error = f"{type(e).__name__}: {e}"
            if self.state.connected:
                log.warning("lost controller %s: %s", self.target, self.state.last_error)
            self.state.connected = False
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.reconnect_max_seconds)

    async def _session(self) -> None:
        async with self.channel_factory(self.target) as channel:
            stub = agrpc.AgentStreamStub(channel)
            call = stub.Connect()
            await call.write(apb.AgentMessage(hello=self.hello()))
            first = await call.read()
            if not isinstance(first, apb.ControllerMessage) or not first.HasField("welcome"):
                raise ConnectionError("controller closed the stream without a welcome")
            sent = first.welcome.resume_after_seq
            self.backlog.ack(sent)
            self.state.connected = True
            self.state.sessions += 1
            self.full, self.skip_telemetry, self._regreet = True, False, False
            log.info("connected to controller %s (resuming after batch %d)", self.target, sent)
            if self.greeting is not None:
                # The state now is the newest word on each view: the views queued while away are older.
                # Written here, not queued: the outbox is bounded, the greeting must arrive whole.
                self._overflowed = False
                self._outbox = collections.deque(
                    (m for m in self._outbox if not m.HasField("observation")), maxlen=self._outbox.maxlen
                )
                for m in self.greeting():
                    await call.write(m)
            reader = asyncio.create_task(self._read(call))
            try:
                last_beat = 0.0
                loop = asyncio.get_running_loop()
                while not reader.done():
                    for batch in self.backlog.after(sent) if not self.skip_telemetry else ():
                        await call.write(apb.AgentMessage(telemetry=batch))
                        sent = batch.seq
                    while self._outbox:
                        m = self._outbox.popleft()
                        if self.full or not m.HasField("observation"):  # views: sent again when full
                            await call.write(m)
                    if self._regreet and self.greeting is not None:
                        # this replica now acts for one of our services: everything it did not hear, at once
                        self._regreet = self._overflowed = False
                        for m in self.greeting():
                            await call.write(m)
                        last_beat = 0.0
                    if self._overflowed and self.full and self.greeting is not None:
                        # a view may be among what was dropped, and views are not repeated: all again,
                        # after what was queued (older)
                        self._overflowed = False
                        for m in self.greeting():
                            await call.write(m)
                    if self.full and loop.time() - last_beat >= self.heartbeat_seconds:
                        await call.write(
                            apb.AgentMessage(heartbeat=apb.Heartbeat(unix_ms=int(1000 * time.time())))
                        )
                        last_beat = loop.time()
                    self._wake.clear()
                    waiter = asyncio.create_task(self._wake.wait())
                    await asyncio.wait(
                        {waiter, reader}, timeout=self.heartbeat_seconds, return_when=asyncio.FIRST_COMPLETED
                    )
                    waiter.cancel()
                await reader  # re-raises the reader's error
            finally:
                reader.cancel()
                call.cancel()

    async def _read(self, call: grpc.aio.StreamStreamCall[apb.AgentMessage, apb.ControllerMessage]) -> None:
        while True:
            msg = await call.read()
            if not isinstance(msg, apb.ControllerMessage):
                raise ConnectionError("controller ended the stream")
            kind = msg.WhichOneof("body")
            if kind == "ack":
                self.backlog.ack(msg.ack.seq)
            elif kind == "reject":
                self._rejected(msg.reject)
            elif kind == "interest":
                if msg.interest.skip_telemetry and not self.skip_telemetry:
                    self.backlog.ack(self.backlog.after(0)[-1].seq if len(self.backlog) else 0)
                self.skip_telemetry = msg.interest.skip_telemetry
                if msg.interest.full and not self.full:
                    self._regreet = True
                    self._wake.set()
                if msg.interest.full != self.full:
                    log.info(
                        "controller %s wants %s: %s",
                        self.target,
                        "heartbeats and views again"
                        if msg.interest.full
                        else "no telemetry"
                        if msg.interest.skip_telemetry
                        else "telemetry only",
                        msg.interest.reason,
                    )
                self.full = msg.interest.full
            elif kind == "command" and self.on_command is not None:
                task = asyncio.create_task(self._run_command(msg.command))
                self._commands.add(task)
                task.add_done_callback(self._commands.discard)

    def _rejected(self, r: apb.Reject) -> None:
        kind = r.kind or "telemetry"  # controllers before Reject.kind rejected only batches
        self.state.rejected[(kind, r.reason_code or "unspecified")] += 1
        what = f"telemetry batch {r.seq}" if kind == "telemetry" else kind
        self.state.last_rejected = f"{what}: {r.field}: {r.reason}"
        if kind == "telemetry":
            self.backlog.drop(r.seq)
            what += ", dropped from the backlog"
        quiet = 0 if kind == "telemetry" else self._throttle((kind, r.reason_code))
        if quiet is not None:
            log.error(
                "controller rejected %s: %s: %s%s",
                what,
                r.field,
                r.reason,
                f" ({quiet} more like it not logged)" if quiet else "",
            )

    async def _run_command(self, cmd: apb.Command) -> None:
        assert self.on_command is not None
        try:
            result = await self.on_command(cmd)
        except Exception as e:  # a failed command is a result, never a dead agent
            log.exception("command %s failed", cmd.command_id)
            result = apb.CommandResult(
                command_id=cmd.command_id,
                incarnation=cmd.incarnation,
                ok=False,
                error=f"{type(e).__name__}: {e}",
            )
        # The controller refuses texts over 4096 characters: the start of an error says what went wrong.
        result.error = result.error[:2000]
        self.send(apb.AgentMessage(result=result))


class ControllerLinks:
    """One link per controller replica ([cluster]): telemetry, observations and lease events go to every
    replica (each keeps the history a new leader forecasts from, and sees what the leader sees); commands
    come from whichever replica leads, and each result goes back on the link its command came in on."""

    def __init__(self, links: list[ControllerLink]) -> None:
        assert links
        self.links = links

    @property
    def on_command(self) -> CommandHandler | None:
        return self.links[0].on_command

    @on_command.setter
    def on_command(self, handler: CommandHandler | None) -> None:
        for link in self.links:
            link.on_command = handler

    @property
    def greeting(self) -> Greeting | None:
        return self.links[0].greeting

    @greeting.setter
    def greeting(self, greeting: Greeting | None) -> None:
        for link in self.links:
            link.greeting = greeting

    @property
    def target(self) -> str:
        return ", ".join(link.target for link in self.links)

    @property
    def connected(self) -> bool:
        return all(link.state.connected for link in self.links)

    @property
    def last_error(self) -> str:
        return "; ".join(f"{k.target}: {k.state.last_error}" for k in self.links if not k.state.connected)

    @property
    def backlog_batches(self) -> int:
        return max(len(link.backlog) for link in self.links)

    @property
    def dropped_total(self) -> int:
        return max(link.backlog.dropped_total for link in self.links)

    @property
    def rejected(self) -> collections.Counter[tuple[str, str]]:
        out: collections.Counter[tuple[str, str]] = collections.Counter()
        for link in self.links:
            out.update(link.state.rejected)
        return out

    @property
    def last_rejected(self) -> str:
        return next((k.state.last_rejected for k in self.links if k.state.last_rejected), "")

    def submit(self, batch: apb.TelemetryBatch) -> None:
        for link in self.links:
            link.submit(batch)

    def send(self, msg: apb.AgentMessage) -> None:
        for link in self.links:
            link.send(msg)

    async def run(self) -> None:
        await asyncio.gather(*(link.run() for link in self.links))


CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]
