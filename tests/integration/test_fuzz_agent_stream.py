"""Fuzzing every message of the agent stream with Hypothesis, against the real controller over a real socket.

Each generated AgentMessage is one of three: valid (it must be accepted: a batch acknowledged, anything else
not refused), valid but for one hostile field (NaN, infinities, counters of 2^63 and more, names nobody
announced, oversized text, timestamps in the future; it must be refused with a Reject naming a field and a
reason), or arbitrary (every field any value its type can carry: accepted or refused, never anything else).
After each one, a probe batch on the same stream must be acknowledged: the stream is still up and answers
in order. Meanwhile a real agent link streams telemetry on another stream: at the end every one of its
batches is stored, it never reconnected, the controller counted exactly the refusals the fuzz stream heard,
and the controller process is alive. Hellos (and raw bytes) open streams of their own.

Reproducible: a fixed seed (printed; SHADOWPLANE_FUZZ_SEED picks another), no example database. About
25 s with the default SHADOWPLANE_FUZZ_EXAMPLES (1500).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from agentd.link import Backlog, ControllerLink
from controller.stream_validation import MAX_OUTPUT_TAIL_CHARS, MAX_TEXT_CHARS
from lab.procs import free_port, wait_for_port
from shadowplane.config import NAME_RE
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb
from tests.integration.test_bad_input import Controller, ScriptedAgent, sample
from tests.integration.test_metrics_http import scrape, series
from tests.protobuf_strategies import messages
from tests.support import PLAINTEXT, Daemon

SEED = int(os.environ.get("SHADOWPLANE_FUZZ_SEED", "20261130"))
EXAMPLES = int(os.environ.get("SHADOWPLANE_FUZZ_EXAMPLES", "1500"))
HELLO_EXAMPLES = max(10, EXAMPLES // 10)
WORKLOADS = ("web", "db", "cache")
NOW_MS = int(time.time() * 1000)  # strategies must not depend on the clock: Hypothesis replays them
BASE_MS = NOW_MS - 30 * 86_400_000  # valid samples: a month ago, unique per seq
SEQ = 1  # what strategies put in a batch's seq: the test gives it the stream's next one
SETTINGS = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

# ---- values ----

text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
u64 = st.integers(0, 2**63 - 1)
u64_bad = st.integers(2**63, 2**64 - 1)
real_bad = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300, 1e308])
long_text = st.integers(MAX_TEXT_CHARS + 1, MAX_TEXT_CHARS + 100).map(lambda n: "x" * n)


def reals(high: float) -> st.SearchStrategy[float]:
    return st.floats(0.0, high, allow_nan=False, allow_infinity=False)


@st.composite
def valid_sample(draw: st.DrawFn, workload: str) -> tpb.WorkloadSample:
    start = BASE_MS  # the test moves it to the batch's own 10 s (see `place`)
    s = tpb.WorkloadSample(
        workload=workload,
        cgroup=f"/{workload}",
        start_unix_ms=start,
        end_unix_ms=start + draw(st.integers(1, 9_999)),
    )
    seconds = (s.end_unix_ms - s.start_unix_ms) / 1000
    r = s.resources
    r.cpu_seconds = draw(reals(seconds * 64))
    r.cpu_limit_cores = draw(reals(64))
    r.memory_bytes, r.memory_limit_bytes, r.io_read_bytes, r.io_write_bytes = (draw(u64) for _ in range(4))
    r.tasks = draw(st.integers(0, 2**32 - 1))
    r.cpu_pressure.some_avg10 = draw(reals(100))
    r.io_pressure.full_stall_us = draw(u64)
    s.syscalls.total = draw(u64)
    for name, n in draw(
        st.dictionaries(st.sampled_from(["read", "write", "accept4", "epoll_wait"]), u64)
    ).items():
        s.syscalls.by_name[name] = n
    s.syscalls.latency.unit = draw(st.sampled_from(["", "ns", "us"]))
    s.syscalls.latency.counts.extend(draw(st.lists(u64, max_size=64)))
    s.block_io.read_ops, s.block_io.write_bytes = draw(u64), draw(u64)
    s.tcp.retransmits = draw(u64)
    for state, n in draw(st.dictionaries(st.sampled_from(["ESTABLISHED", "CLOSE", "SYN_SENT"]), u64)).items():
        s.tcp.state_changes[state] = n
    return s


# ---- messages: valid ones, and each of them with one hostile field ----


@dataclass
class Seqs:
    """Sequence numbers of the fuzz stream: valid batches and probes take the next one."""

    n: int = 0

    def next(self) -> int:
        self.n += 1
        return self.n


SEQS = Seqs()


@st.composite
def valid_telemetry(draw: st.DrawFn) -> apb.AgentMessage:
    names = draw(st.lists(st.sampled_from(WORKLOADS), min_size=1, max_size=3, unique=True))
    batch = apb.TelemetryBatch(seq=SEQ, samples=[draw(valid_sample(w)) for w in names])
    batch.capture.dropped_events["ringbuf"] = draw(u64)
    return apb.AgentMessage(telemetry=batch)


@st.composite
def valid_observation(draw: st.DrawFn) -> apb.AgentMessage:
    return apb.AgentMessage(
        observation=apb.Observation(
            service="web",
            target=draw(st.sampled_from(["p1", "fuzz"])),
            up=draw(st.booleans()),
            detail=draw(text),
            since_unix_ms=draw(st.integers(0, NOW_MS)),
            kind=draw(st.sampled_from(["health", "lease"])),
            token=draw(u64),
        )
    )


@st.composite
def valid_lease_event(draw: st.DrawFn) -> apb.AgentMessage:
    return apb.AgentMessage(
        lease_event=apb.LeaseEvent(
            service="web",
            token=draw(u64),
            what=draw(st.sampled_from(["lost", "released", "acquired", "resumed"])),
            reason=draw(text),
            unix_ms=draw(st.integers(1, NOW_MS)),
        )
    )


@st.composite
def valid_heartbeat(draw: st.DrawFn) -> apb.AgentMessage:
    return apb.AgentMessage(heartbeat=apb.Heartbeat(unix_ms=draw(st.integers(1, NOW_MS))))


def setter(path: str) -> Callable[[Message, object], None]:
    """Sets one field by dotted path; "[0]" picks a list's first item, "{key}" a map entry."""

    def put(m: Message, v: object) -> None:
        obj: Any = m
        *parents, last = path.split(".")
        for p in parents:
            obj = getattr(obj, p.removesuffix("[0]"))
            if p.endswith("[0]"):
                obj = obj[0]
        name, _, key = last.partition("{")
        if key:
            getattr(obj, name)[key.rstrip("}")] = v
        else:
            setattr(obj, name, v)

    return put


S = "telemetry.samples[0]"
HOSTILE: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {
    "telemetry": [
        ("telemetry.seq", st.one_of(st.just(0), u64_bad)),
        (f"{S}.workload", st.one_of(text.filter(lambda w: w not in WORKLOADS), long_text)),
        (f"{S}.start_unix_ms", st.integers(-(2**63), 0)),
        (f"{S}.end_unix_ms", st.integers(-(2**63), BASE_MS)),
        (f"{S}.end_unix_ms", st.integers(NOW_MS + 86_400_000, 2**63 - 1)),
        (f"{S}.cgroup", st.integers(5000, 6000).map(lambda n: "/" * n)),
        (f"{S}.resources.cpu_seconds", real_bad),
        (f"{S}.resources.cpu_limit_cores", real_bad),
        (f"{S}.resources.memory_bytes", u64_bad),
        (f"{S}.resources.io_write_bytes", u64_bad),
        (f"{S}.resources.cpu_throttled_us", u64_bad),
        (f"{S}.resources.limits_reapplied", u64_bad),
        (f"{S}.resources.limits_problem", long_text),
        (f"{S}.resources.memory_pressure.full_avg10", st.one_of(real_bad, st.floats(100.001, 1e9))),
        (f"{S}.syscalls.total", u64_bad),
        (f"{S}.syscalls.by_name{{read}}", u64_bad),
        (f"{S}.syscalls.latency.unit", text.filter(lambda u: u not in ("", "ns", "us"))),
        (f"{S}.block_io.discard_bytes", u64_bad),
        (f"{S}.tcp.resets_received", u64_bad),
        (f"{S}.tcp.state_changes{{ESTABLISHED}}", u64_bad),
        ("telemetry.capture.telemetry_batches_dropped", u64_bad),
        ("telemetry.capture.bpf_unavailable_reason", long_text),
    ],
    "observation": [
        ("observation.service", text.filter(lambda s: s != "web")),
        ("observation.target", text.filter(lambda s: not NAME_RE.match(s))),  # no host name at all
        ("observation.kind", text.filter(lambda s: s not in ("health", "lease"))),
        ("observation.detail", long_text),
        (
            "observation.since_unix_ms",
            st.one_of(st.integers(-(2**63), -1), st.integers(NOW_MS + 86_400_000, 2**63 - 1)),
        ),
        ("observation.token", u64_bad),
    ],
    "lease_event": [
        ("lease_event.service", text.filter(lambda s: s != "web")),
        ("lease_event.what", text.filter(lambda s: s not in ("lost", "released", "acquired", "resumed"))),
        ("lease_event.token", u64_bad),
        ("lease_event.reason", long_text),
        (
            "lease_event.unix_ms",
            st.one_of(st.integers(-(2**63), 0), st.integers(NOW_MS + 86_400_000, 2**63 - 1)),
        ),
    ],
    "heartbeat": [
        (
            "heartbeat.unix_ms",
            st.one_of(st.integers(-(2**63), 0), st.integers(NOW_MS + 86_400_000, 2**63 - 1)),
        ),
    ],
}
VALID = {
    "telemetry": valid_telemetry,
    "observation": valid_observation,
    "lease_event": valid_lease_event,
    "heartbeat": valid_heartbeat,
}


@st.composite
def hostile(draw: st.DrawFn) -> apb.AgentMessage:
    kind = draw(st.sampled_from(sorted(HOSTILE)))
    msg = draw(VALID[kind]())
    path, values = draw(st.sampled_from(HOSTILE[kind]))
    setter(path)(msg, draw(values))
    return msg


@st.composite
def hostile_result(draw: st.DrawFn) -> apb.AgentMessage:
    """Results answer no command the controller is waiting for (or are malformed): all refused."""
    r = apb.CommandResult(
        command_id=draw(st.one_of(text, st.just(""), long_text)),
        incarnation=draw(text),
        ok=draw(st.booleans()),
        error=draw(st.one_of(text, long_text)),
    )
    detail = draw(st.sampled_from(["vote", "hook", "address", "limits", None]))
    if detail == "vote":
        r.vote.promised_token = draw(st.one_of(u64, u64_bad))
    elif detail == "hook":
        r.hook.output_tail = draw(st.one_of(text, st.just("y" * (MAX_OUTPUT_TAIL_CHARS + 1))))
    elif detail == "address":
        r.address.token = draw(st.one_of(u64, u64_bad))
    elif detail == "limits":
        r.limits.cpu_cores = draw(st.one_of(reals(8), real_bad))
    return apb.AgentMessage(result=r)


# ---- arbitrary: any value of each field's type, from the descriptors (so new fields are fuzzed too) ----


def arbitrary(kind: str) -> st.SearchStrategy[apb.AgentMessage]:
    """An AgentMessage whose `kind` body has any value in any field (tests/protobuf_strategies.py); no
    field repeated thousands of times: a stream message that large is refused by gRPC, not by the checks."""
    body = apb.AgentMessage.DESCRIPTOR.fields_by_name[kind].message_type
    return messages(body, depth=3, max_repeated=3, long_repeated=0).map(
        lambda m: apb.AgentMessage(**{kind: m})
    )


BODIES = ("telemetry", "heartbeat", "result", "observation", "lease_event", "hello")


@st.composite
def fuzzed(draw: st.DrawFn) -> tuple[str, apb.AgentMessage]:
    """(what must happen: "accept", "reject" or "either", the message)."""
    mode = draw(st.sampled_from(["valid", "hostile", "hostile", "result", "arbitrary", "arbitrary"]))
    if mode == "valid":
        return "accept", draw(VALID[draw(st.sampled_from(sorted(VALID)))]())
    if mode == "hostile":
        return "reject", draw(hostile())
    if mode == "result":
        return "reject", draw(hostile_result())
    kind = draw(st.sampled_from(BODIES))
    expect = "reject" if kind in ("hello", "result") else "either"  # a second hello; results of nothing
    msg = draw(arbitrary(kind))
    if kind == "telemetry":
        # An agent's sequence numbers are its own: a jump would only make its own later batches look like
        # resends (acknowledged, not stored), so the fuzz stream keeps them increasing.
        msg.telemetry.seq = SEQ
    return expect, msg


def place(expect: str, msg: apb.AgentMessage) -> None:
    """Give a batch the stream's next seq, and a valid batch's samples that seq's own 10 s (so that no
    two valid samples share an end time and every one of them is stored)."""
    if msg.WhichOneof("body") != "telemetry" or msg.telemetry.seq != SEQ:
        return
    seq = msg.telemetry.seq = SEQS.next()
    if expect == "accept":
        for s in msg.telemetry.samples:
            length = s.end_unix_ms - s.start_unix_ms
            s.start_unix_ms = BASE_MS + seq * 10_000
            s.end_unix_ms = s.start_unix_ms + length


# ---- the real controller, a fuzz stream and a well-behaved agent ----


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    port, metrics_port, nobody = free_port(), free_port(), free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\n[store]\npath = "{tmp_path}/c.db"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n[scaling]\nenabled = false\n'
        '[[host]]\nname = "good"\n[[host]]\nname = "fuzz"\n[[host]]\nname = "hello-fuzz"\n'
        '[[host]]\nname = "p1"\naddress = "127.0.0.1"\n'
        # fuzz observes web (a shadow), so its valid observations and lease events are accepted; nothing
        # listens on the health port, so web is never placed and no command waits on the fuzz stream
        '[[service]]\nname = "web"\nprimary = "p1"\nshadows = ["fuzz"]\nvip = "10.250.0.1/24"\n'
        f"[service.health]\nport = {nobody}\n" + PLAINTEXT
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        wait_for_port("127.0.0.1", metrics_port, 20, d.proc)
        yield Controller(d, port, metrics_port)
    finally:
        d.stop()


def hello(host: str) -> apb.Hello:
    return apb.Hello(
        host=host,
        instance_id=f"{host}-{time.monotonic_ns()}",
        workloads=[tpb.WorkloadInfo(name=w, cgroup=f"/{w}", service="web") for w in WORKLOADS],
        interval_ms=1000,
    )


@dataclass
class GoodAgent:
    """The agent's real link in a thread of its own, sending a batch every 50 ms."""

    port: int
    sent: int = 0
    link: ControllerLink | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        h = hello("good")
        self.link = ControllerLink(
            f"127.0.0.1:{self.port}", lambda: h, Backlog(100_000), heartbeat_seconds=0.2
        )
        task = asyncio.create_task(self.link.run())
        while not self.stop.is_set():
            self.sent += 1
            self.link.submit(apb.TelemetryBatch(seq=self.sent, samples=[sample(self.sent)]))
            await asyncio.sleep(0.05)
        while len(self.link.backlog):
            await asyncio.sleep(0.05)
        task.cancel()


class FuzzStream:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.agent = ScriptedAgent(self.channel)
        self.agent.send(apb.AgentMessage(hello=hello("fuzz")))
        assert self._next().HasField("welcome")
        self.rejected = 0

    def _next(self) -> apb.ControllerMessage:
        while True:
            m = self.agent.reply(timeout=10)
            assert isinstance(m, apb.ControllerMessage), f"the fuzz stream ended: {m}"
            if not m.HasField("command"):  # a Watch: the fuzz host observes web
                return m

    def exchange(self, msg: apb.AgentMessage) -> tuple[list[apb.Reject], list[int]]:
        """Send `msg` then a probe batch; what came back before the probe's acknowledgement."""
        self.agent.send(msg)
        probe = SEQS.next()
        self.agent.send(apb.AgentMessage(telemetry=apb.TelemetryBatch(seq=probe)))
        rejects, acks = [], []
        while True:
            m = self._next()
            if m.HasField("ack") and m.ack.seq == probe:
                self.rejected += len(rejects)
                return rejects, acks
            if m.HasField("ack"):
                acks.append(m.ack.seq)
            else:
                assert m.HasField("reject"), m
                rejects.append(m.reject)


def test_fuzzed_agent_messages_are_answered_and_the_controller_keeps_serving(controller: Controller) -> None:
    print(
        f"\nfuzz: seed {SEED} (SHADOWPLANE_FUZZ_SEED), {EXAMPLES} stream messages, {HELLO_EXAMPLES} streams"
    )
    good = GoodAgent(controller.port)
    thread = threading.Thread(target=good.run, daemon=True)
    thread.start()
    fuzz = FuzzStream(controller.port)
    tally = {"accept": 0, "reject": 0, "either": 0}
    stored_samples = 0

    @seed(SEED)
    @settings(SETTINGS, max_examples=EXAMPLES)
    @given(fuzzed())
    def one_message(case: tuple[str, apb.AgentMessage]) -> None:
        nonlocal stored_samples
        expect, msg = case
        place(expect, msg)
        tally[expect] += 1
        kind = msg.WhichOneof("body")
        rejects, acks = fuzz.exchange(msg)
        assert len(rejects) <= 1, rejects
        for r in rejects:
            assert r.kind == kind and r.field and r.reason and r.reason_code, r
            if kind == "telemetry":
                assert r.seq == msg.telemetry.seq
        if expect == "accept":
            assert not rejects, f"a valid {kind} was refused: {rejects[0]}"
            if kind == "telemetry":
                assert acks == [msg.telemetry.seq]
                stored_samples += len(msg.telemetry.samples)
        elif expect == "reject":
            assert rejects, f"{kind} accepted: {msg}"
        if kind == "telemetry" and not rejects:
            assert acks == [msg.telemetry.seq], "a batch is acknowledged or rejected"

    one_message()
    print(f"fuzz: {tally} (expected outcomes), {fuzz.rejected} refused on the fuzz stream")

    @seed(SEED)
    @settings(SETTINGS, max_examples=HELLO_EXAMPLES)
    @given(
        st.one_of(
            st.builds(lambda: apb.AgentMessage(hello=hello("hello-fuzz"))),
            # (not as the streaming hosts: a welcome would replace their streams, as a restarted agent's does)
            arbitrary("hello").filter(lambda m: m.hello.host not in ("good", "fuzz", "p1")),
            st.sampled_from(["telemetry", "heartbeat", "result"]).flatmap(arbitrary),
        ),
        st.booleans(),
    )
    def one_stream(first: apb.AgentMessage, raw: bool) -> None:
        """A stream of its own: a welcome, or an error naming what is wrong; raw bytes may not parse."""
        with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as ch:
            a = ScriptedAgent(ch, serialize=not raw)
            a.send(first.SerializeToString()[::-1] if raw else first)
            reply = a.reply(timeout=10)
            a.close()
        if isinstance(reply, apb.ControllerMessage):
            assert reply.HasField("welcome") and not raw and first.hello.host == "hello-fuzz"
        else:
            assert isinstance(reply, grpc.RpcError)
            assert reply.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
            assert reply.details()

    one_stream()

    good.stop.set()
    thread.join(30)
    assert good.link is not None and not thread.is_alive()
    assert good.link.state.sessions == 1 and not good.link.state.rejected, good.link.state
    assert len(controller.stored("good")) == good.sent, "every batch of the well-behaved agent is stored"
    assert len(controller.stored("fuzz")) >= stored_samples, "every valid fuzzed sample is stored"
    assert controller.daemon.alive()
    counted = series(scrape(controller.metrics_port), "shadowplane_controller_agent_messages_rejected_total")
    on_stream = sum(n for labels, n in counted.items() if 'host="fuzz"' in labels)
    assert on_stream == fuzz.rejected, counted
    assert not any('host="good"' in labels for labels in counted)
    assert fuzz.exchange(apb.AgentMessage(heartbeat=apb.Heartbeat(unix_ms=int(time.time() * 1000)))) == (
        [],
        [],
    )
