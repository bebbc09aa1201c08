"""The agent stream's checks: a valid message passes, and changing one field to garbage is refused naming
that field and a stable reason code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from controller.config import ControllerConfig, HostEntry, ServiceConfig
from controller.stream_validation import (
    MAX_CLOCK_AHEAD_MS,
    Fleet,
    Problem,
    check_answer,
    check_hello,
    check_message,
)
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

NOW = 1_800_000_000_000
FLEET = Fleet.of(
    ControllerConfig(
        host=[HostEntry(name="p1", address="10.0.0.1"), HostEntry(name="s1")],
        service=[ServiceConfig(name="web", primary="p1", shadows=["s1"])],
    )
)


def hello(host: str = "s1") -> apb.Hello:
    return apb.Hello(
        host=host,
        instance_id="i1",
        agent_version="0.1.0",
        workloads=[tpb.WorkloadInfo(name="web", cgroup="/w", role=tpb.ROLE_SHADOW, service="web")],
        interval_ms=1000,
    )


def telemetry() -> apb.AgentMessage:
    s = tpb.WorkloadSample(workload="web", cgroup="/w", start_unix_ms=NOW - 1000, end_unix_ms=NOW)
    s.resources.cpu_seconds = 0.5
    s.resources.memory_bytes = 1 << 30
    s.syscalls.total = 1000
    s.syscalls.by_name["accept4"] = 10
    s.syscalls.latency.unit = "ns"
    s.syscalls.latency.counts.extend([1, 2, 3])
    return apb.AgentMessage(telemetry=apb.TelemetryBatch(seq=1, samples=[s]))


def observation() -> apb.AgentMessage:
    return apb.AgentMessage(
        observation=apb.Observation(
            service="web", target="p1", up=True, detail="ok", since_unix_ms=NOW, kind="health"
        )
    )


def lease_event() -> apb.AgentMessage:
    return apb.AgentMessage(
        lease_event=apb.LeaseEvent(service="web", token=3, what="lost", reason="r", unix_ms=NOW)
    )


def result() -> apb.AgentMessage:
    return apb.AgentMessage(
        result=apb.CommandResult(
            command_id="abc-1", incarnation="abc", ok=True, vote=apb.VoteReply(granted=True, promised_token=4)
        )
    )


def heartbeat() -> apb.AgentMessage:
    return apb.AgentMessage(heartbeat=apb.Heartbeat(unix_ms=NOW))


def check(msg: apb.AgentMessage) -> Problem | None:
    return check_message(msg, hello(), FLEET, NOW)[1]


def _set(path: str, value: object) -> Callable[[apb.AgentMessage], None]:
    """A mutation: set one field, by dotted path ("[n]" for a list item), to `value`."""

    def mutate(m: apb.AgentMessage) -> None:
        obj: object = m
        *parents, last = path.split(".")
        for part in parents:
            name, _, idx = part.partition("[")
            obj = getattr(obj, name)
            if idx:
                obj = obj[int(idx.rstrip("]"))]  # type: ignore[index]
        name, _, key = last.partition("[")
        if key:
            getattr(obj, name)[key.rstrip("]").strip("'")] = value
        else:
            setattr(obj, name, value)

    return mutate


S = "telemetry.samples[0]"
CASES: list[tuple[Callable[[], apb.AgentMessage], str, object, str, str]] = [
    # (a valid message, the field changed, its new value, the field the problem names, the reason code)
    (telemetry, "telemetry.seq", 0, "seq", "missing"),
    (telemetry, "telemetry.seq", 2**63, "seq", "too_large"),
    (telemetry, f"{S}.workload", "ghost", "samples[0].workload", "unknown_workload"),
    (telemetry, f"{S}.end_unix_ms", NOW - 1000, "samples[0].end_unix_ms", "bad_interval"),
    (telemetry, f"{S}.start_unix_ms", -5, "samples[0].end_unix_ms", "bad_interval"),
    (telemetry, f"{S}.end_unix_ms", NOW + MAX_CLOCK_AHEAD_MS + 60_000, "samples[0].end_unix_ms", "future"),
    (telemetry, f"{S}.resources.cpu_seconds", float("nan"), "samples[0].resources.cpu_seconds", "not_finite"),
    (telemetry, f"{S}.resources.cpu_seconds", float("inf"), "samples[0].resources.cpu_seconds", "not_finite"),
    (telemetry, f"{S}.resources.cpu_seconds", -1.0, "samples[0].resources.cpu_seconds", "negative"),
    (telemetry, f"{S}.resources.cpu_seconds", 1e300, "samples[0].resources.cpu_seconds", "too_large"),
    (telemetry, f"{S}.resources.memory_bytes", 2**63, "samples[0].resources.memory_bytes", "too_large"),
    (
        telemetry,
        f"{S}.resources.cpu_limit_cores",
        float("-inf"),
        "samples[0].resources.cpu_limit_cores",
        "not_finite",
    ),
    (
        telemetry,
        f"{S}.resources.io_pressure.some_avg10",
        float("nan"),
        "samples[0].resources.io_pressure.some_avg10",
        "not_finite",
    ),
    (telemetry, f"{S}.syscalls.total", 2**64 - 1, "samples[0].syscalls.total", "too_large"),
    (telemetry, f"{S}.syscalls.by_name['read']", 2**63, "samples[0].syscalls.by_name['read']", "too_large"),
    (telemetry, f"{S}.syscalls.by_name['" + "x" * 65 + "']", 1, "samples[0].syscalls.by_name", "bad_name"),
    (telemetry, f"{S}.syscalls.latency.unit", "furlongs", "samples[0].syscalls.latency.unit", "bad_value"),
    (telemetry, f"{S}.cgroup", "/" + "x" * 5000, "samples[0].cgroup", "too_long"),
    (telemetry, f"{S}.tcp.retransmits", 2**63, "samples[0].tcp.retransmits", "too_large"),
    (
        telemetry,
        "telemetry.capture.telemetry_batches_dropped",
        2**63,
        "capture.telemetry_batches_dropped",
        "too_large",
    ),
    (observation, "observation.service", "nope", "observation.service", "unknown_service"),
    (observation, "observation.target", "ghost", "observation.target", "unknown_host"),
    (observation, "observation.kind", "vibes", "observation.kind", "bad_value"),
    (observation, "observation.detail", "x" * 5000, "observation.detail", "too_long"),
    (observation, "observation.since_unix_ms", -1, "observation.since_unix_ms", "negative"),
    (observation, "observation.token", 2**63, "observation.token", "too_large"),
    (lease_event, "lease_event.service", "", "lease_event.service", "unknown_service"),
    (lease_event, "lease_event.what", "stolen", "lease_event.what", "bad_value"),
    (lease_event, "lease_event.unix_ms", NOW + 3_600_000, "lease_event.unix_ms", "future"),
    (lease_event, "lease_event.token", 2**64 - 1, "lease_event.token", "too_large"),
    (result, "result.command_id", "", "result.command_id", "missing"),
    (result, "result.ok", False, "result.error", "missing"),
    (result, "result.error", "e\x00", "result.error", "bad_value"),
    (result, "result.vote.promised_token", 2**63, "result.vote.promised_token", "too_large"),
    (heartbeat, "heartbeat.unix_ms", -1, "heartbeat.unix_ms", "negative"),
    (heartbeat, "heartbeat.unix_ms", NOW + 3_600_000, "heartbeat.unix_ms", "future"),
]


@pytest.mark.parametrize(
    ("make", "path", "value", "field", "code"), CASES, ids=[f"{c[1]}={c[2]!r:.20}" for c in CASES]
)
def test_one_bad_field_is_refused_naming_it(
    make: Callable[[], apb.AgentMessage], path: str, value: object, field: str, code: str
) -> None:
    msg = make()
    assert check(msg) is None, "the unchanged message is valid"
    _set(path, value)(msg)
    problem = check(msg)
    assert problem is not None and (problem.field, problem.code) == (field, code), problem
    assert problem.detail


def test_observations_and_lease_events_only_from_their_service_s_hosts() -> None:
    o = observation()
    # with one shadow the primary is a witness on the lease (ServiceConfig.lease_quorum): it reports what
    # it granted, never a host's health
    assert check_message(o, hello("p1"), FLEET, NOW)[1] == Problem(
        "observation.service", "not_observer", "p1 is no observer of web"
    )
    o.observation.kind = "lease"
    assert check_message(o, hello("p1"), FLEET, NOW)[1] is None
    alone = Fleet(FLEET.hosts, {"web": replace(FLEET.services["web"], witnesses=frozenset())})
    assert check_message(o, hello("p1"), alone, NOW)[1] == Problem(
        "observation.service", "not_observer", "p1 is no observer of web"
    )
    e = lease_event()
    assert check_message(e, hello("p1"), FLEET, NOW)[1] is None
    outsider = Fleet(FLEET.hosts | {"x1"}, FLEET.services)
    p = check_message(e, hello("x1"), outsider, NOW)[1]
    assert p is not None and p.code == "not_in_service"


def test_a_lease_view_names_whoever_the_observer_granted() -> None:
    """Even a holder that is no host of the service (a rogue renewal) reaches the board: the observer then
    no longer counts for the real owner."""
    o = observation()
    o.observation.kind, o.observation.target = "lease", "rogue"
    assert check(o) is None
    o.observation.target = "not a name"
    p = check(o)
    assert p is not None and (p.field, p.code) == ("observation.target", "bad_name")


def test_an_empty_message_and_a_second_hello_are_refused() -> None:
    assert check_message(apb.AgentMessage(), hello(), FLEET, NOW) == (
        "none",
        Problem("body", "missing", "no message body: is this agent newer than the controller?"),
    )
    kind, p = check_message(apb.AgentMessage(hello=hello()), hello(), FLEET, NOW)
    assert kind == "hello" and p is not None and p.code == "unexpected"


@pytest.mark.parametrize(
    ("path", "value", "field", "code"),
    [
        ("host", "", "hello.host", "missing"),
        ("host", "intruder", "hello.host", "unknown_host"),
        ("host", "s1; rm -rf", "hello.host", "bad_name"),
        ("instance_id", "", "hello.instance_id", "missing"),
        ("instance_id", "i" * 200, "hello.instance_id", "too_long"),
        ("workloads[0].name", "", "hello.workloads[0].name", "missing"),
        ("workloads[0].name", "w" * 64, "hello.workloads[0].name", "bad_name"),
        ("workloads[0].cgroup", "relative", "hello.workloads[0].cgroup", "bad_value"),
        ("workloads[0].role", 7, "hello.workloads[0].role", "bad_value"),
        ("host_info.memory_bytes", 2**63, "hello.host_info.memory_bytes", "too_large"),
        (
            "capture.dropped_events['ringbuf']",
            2**64 - 1,
            "hello.capture.dropped_events['ringbuf']",
            "too_large",
        ),
    ],
)
def test_a_bad_hello_names_the_field(path: str, value: object, field: str, code: str) -> None:
    msg = apb.AgentMessage(hello=hello())
    assert check_hello(msg.hello, FLEET, NOW) is None
    _set(f"hello.{path}", value)(msg)
    problem = check_hello(msg.hello, FLEET, NOW)
    assert problem is not None and (problem.field, problem.code) == (field, code), problem
    if code == "unknown_host":
        assert "not in the controller's [[host]] list" in problem.detail


def test_a_capture_feature_without_a_name_is_refused() -> None:
    msg = apb.AgentMessage(hello=hello())
    msg.hello.capture.features.add(name="syscalls", captured=True, detail="every system call")
    assert check_hello(msg.hello, FLEET, NOW) is None
    msg.hello.capture.features.add(name="", captured=False, detail="x")
    problem = check_hello(msg.hello, FLEET, NOW)
    assert problem is not None
    assert (problem.field, problem.code) == ("hello.capture.features[1].name", "missing")


def test_duplicate_workloads_in_a_hello() -> None:
    h = hello()
    h.workloads.add(name="web", cgroup="/w2")
    assert check_hello(h, FLEET, NOW) == Problem("hello.workloads", "duplicate", "duplicate workload names")


def _cmd(**action: object) -> apb.Command:
    return apb.Command(command_id="abc-7", incarnation="abc", **action)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cmd", "res", "field"),
    [
        # a vote answered without a vote reply, or with an address state
        (_cmd(vote=apb.Vote(service="web", token=4)), apb.CommandResult(ok=True), "result.vote"),
        (
            _cmd(vote=apb.Vote(service="web", token=4)),
            apb.CommandResult(ok=True, address=apb.AddressState(service="web", token=4)),
            "result.address",
        ),
        (
            _cmd(vote=apb.Vote(service="web", token=4)),
            apb.CommandResult(ok=True, vote=apb.VoteReply(granted=True, promised_token=3)),
            "result.vote.promised_token",
        ),
        (
            _cmd(acquire=apb.Acquire(service="web", token=4)),
            apb.CommandResult(ok=True, address=apb.AddressState(service="db", token=4)),
            "result.address.service",
        ),
        (
            _cmd(acquire=apb.Acquire(service="web", token=4)),
            apb.CommandResult(ok=True, address=apb.AddressState(service="web", token=3)),
            "result.address.token",
        ),
        (
            _cmd(run_hook=apb.RunHook(service="web", phase="before-takeover")),
            apb.CommandResult(ok=True, hook=apb.HookResult(phase="after-release")),
            "result.hook.phase",
        ),
        (
            _cmd(set_limits=apb.SetLimits(workload="web")),
            apb.CommandResult(ok=True, limits=apb.LimitsApplied(workload="db")),
            "result.limits.workload",
        ),
        (
            _cmd(watch=apb.Watch()),
            apb.CommandResult(ok=True, vote=apb.VoteReply(granted=True)),
            "result.vote",
        ),
        # a failed hook command without its result would read as "no hook installed"
        (
            _cmd(run_hook=apb.RunHook(service="web", phase="before-takeover")),
            apb.CommandResult(ok=False, error="ValueError: boom"),
            "result.hook",
        ),
        (
            _cmd(vote=apb.Vote(service="web", token=4)),
            apb.CommandResult(ok=False, error="boom"),
            "result.vote",
        ),
    ],
)
def test_a_result_must_answer_its_command(cmd: apb.Command, res: apb.CommandResult, field: str) -> None:
    problem = check_answer(cmd, res)
    assert problem is not None and (problem.field, problem.code) == (field, "wrong_answer"), problem


@pytest.mark.parametrize(
    ("cmd", "res"),
    [
        (
            _cmd(vote=apb.Vote(service="web", token=4)),
            apb.CommandResult(ok=True, vote=apb.VoteReply(granted=True, promised_token=4)),
        ),
        (
            _cmd(vote=apb.Vote(service="web", token=4)),
            apb.CommandResult(ok=True, vote=apb.VoteReply(granted=False, promised_token=9)),
        ),
        (_cmd(acquire=apb.Acquire(service="web", token=4)), apb.CommandResult(ok=False, error="no")),
        (
            _cmd(release=apb.Release(service="web")),
            apb.CommandResult(ok=True, address=apb.AddressState(service="web", token=3)),
        ),
        (_cmd(watch=apb.Watch()), apb.CommandResult(ok=True)),
    ],
)
def test_right_answers_pass(cmd: apb.Command, res: apb.CommandResult) -> None:
    assert check_answer(cmd, res) is None
