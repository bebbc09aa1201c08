"""Command results against the real controller over a real socket: a result must answer its command (a vote
answered with an address state is refused and its caller fails with the reason), and a late result meant for
an earlier controller is never taken for a command of this one (command ids carry the incarnation)."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from lab.procs import free_port, wait_for_port
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import telemetry_pb2 as tpb
from tests.integration.test_bad_input import ScriptedAgent
from tests.support import PLAINTEXT, Daemon, wait_until

Answer = Callable[[apb.Command], apb.CommandResult]


def right(cmd: apb.Command) -> apb.CommandResult:
    """What a well-behaved agent answers."""
    r = apb.CommandResult(command_id=cmd.command_id, incarnation=cmd.incarnation, ok=True)
    kind = cmd.WhichOneof("action")
    if kind == "vote":
        r.vote.CopyFrom(apb.VoteReply(granted=True, promised_token=cmd.vote.token))
    elif kind == "acquire":
        r.address.CopyFrom(apb.AddressState(service=cmd.acquire.service, token=cmd.acquire.token))
    elif kind == "release":
        r.address.CopyFrom(apb.AddressState(service=cmd.release.service, token=cmd.release.token))
    elif kind == "run_hook":
        r.hook.CopyFrom(apb.HookResult(phase=cmd.run_hook.phase, found=False))
    elif kind == "set_limits":
        r.limits.CopyFrom(apb.LimitsApplied(workload=cmd.set_limits.workload))
    return r


class Agent:
    """A scripted agent that answers commands with `answer` and sends heartbeats; records what it hears."""

    def __init__(self, port: int, host: str, role: tpb.Role.ValueType, answer: Answer = right) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stream = ScriptedAgent(self.channel)
        self.answer = answer
        self.commands: list[apb.Command] = []
        self.rejects: queue.Queue[apb.Reject] = queue.Queue()
        self.stop = threading.Event()
        self.stream.send(
            apb.AgentMessage(
                hello=apb.Hello(
                    host=host,
                    instance_id=f"{host}-{time.monotonic_ns()}",
                    workloads=[tpb.WorkloadInfo(name="web", cgroup="/w", role=role, service="web")],
                    interval_ms=1000,
                )
            )
        )
        welcome = self.stream.reply()
        assert isinstance(welcome, apb.ControllerMessage) and welcome.HasField("welcome"), welcome
        threading.Thread(target=self._serve, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                m = self.stream.reply(timeout=0.2)
            except queue.Empty:
                continue
            if not isinstance(m, apb.ControllerMessage):
                return  # the stream ended
            if m.HasField("command"):
                self.commands.append(m.command)
                self.send(apb.AgentMessage(result=self.answer(m.command)))
            elif m.HasField("reject"):
                self.rejects.put(m.reject)

    def _beat(self) -> None:
        while not self.stop.wait(0.2):
            self.send(apb.AgentMessage(heartbeat=apb.Heartbeat(unix_ms=int(time.time() * 1000))))

    def send(self, msg: apb.AgentMessage) -> None:
        self.stream.send(msg)

    def command(self, kind: str) -> apb.Command:
        return next(c for c in self.commands if c.WhichOneof("action") == kind)

    def reject(self, timeout: float = 10.0) -> apb.Reject:
        return self.rejects.get(timeout=timeout)

    def close(self) -> None:
        self.stop.set()
        self.stream.close()
        self.channel.close()


@pytest.fixture
def service_port() -> Iterator[int]:
    """p1's service: a TCP port that accepts, so the controller's health check sees p1 up."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                sock.accept()[0].close()

    threading.Thread(target=accept, daemon=True).start()
    yield sock.getsockname()[1]
    stop.set()
    sock.close()


@pytest.fixture
def controller(tmp_path: Path, service_port: int) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\n[store]\npath = "{tmp_path}/c.db"\n'
        "[scaling]\nenabled = false\n"
        "[failover]\nlease_seconds = 0.5\nrenew_interval_seconds = 0.1\n"
        '[[host]]\nname = "p1"\naddress = "127.0.0.1"\n[[host]]\nname = "s1"\naddress = "127.0.0.1"\n'
        '[[service]]\nname = "web"\nprimary = "p1"\nshadows = ["s1"]\nvip = "10.250.0.1/24"\n'
        # the controller and s1 only (not the default's primary as a lease witness): s1's vote decides
        'hook_timeout_seconds = 1\nobservers = ["controller", "s1"]\n'
        f"[service.health]\nport = {service_port}\ninterval_seconds = 0.1\nrise = 1\nfall = 1\n" + PLAINTEXT
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        yield d, port
        assert d.alive()
    finally:
        d.stop()


def events(port: int, kind: str) -> list[fpb.Event]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        got = fgrpc.FleetStub(ch).ListEvents(fpb.ListEventsRequest(service="web", limit=1000), timeout=5)
    return [e for e in got.events if e.kind == kind]


def owner(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        services = fgrpc.FleetStub(ch).ListServices(fpb.ListServicesRequest(), timeout=5).services
    return next(s.owner for s in services if s.name == "web")


def test_a_vote_answered_with_an_address_state_is_refused_and_the_move_aborted(
    controller: tuple[Daemon, int],
) -> None:
    _, port = controller
    votes = 0

    def s1_answers(cmd: apb.Command) -> apb.CommandResult:
        nonlocal votes
        r = right(cmd)
        if cmd.HasField("vote"):
            votes += 1
            if votes == 1:  # the first vote is answered with an address state
                r.address.CopyFrom(apb.AddressState(service="web", token=cmd.vote.token, holds_address=True))
            if votes == 2:  # the second with an error no controller takes (too long), failing
                r.ok, r.error = False, "x" * 5000
                r.ClearField("vote")
        return r

    p1 = Agent(port, "p1", tpb.ROLE_PRIMARY)
    s1 = Agent(port, "s1", tpb.ROLE_SHADOW, s1_answers)
    try:
        # s1 observes web (the controller and the shadow are its observers) and sees p1 up: web is placed
        # on p1, which takes a majority of votes: the controller's and s1's.
        s1.send(
            apb.AgentMessage(
                observation=apb.Observation(
                    service="web", target="p1", up=True, kind="health", since_unix_ms=int(time.time() * 1000)
                )
            )
        )
        rej = s1.reject(timeout=20)
        assert (rej.kind, rej.field, rej.reason_code) == ("result", "result.address", "wrong_answer")
        assert "a vote command is answered with vote, not address" in rej.reason
        (aborted, *_) = wait_until(lambda: events(port, "takeover-aborted"), 10, "the move aborted")  # type: ignore[misc]
        assert "answered command" in aborted.reason and "not address" in aborted.reason
        # A malformed result fails the vote at once with the reason, not after a timeout.
        rej = s1.reject(timeout=20)
        assert (rej.kind, rej.field, rej.reason_code) == ("result", "result.error", "too_long")
        aborted = wait_until(lambda: events(port, "takeover-aborted")[1:], 10, "the second move aborted")[0]  # type: ignore[index]
        assert "result.error: 5000 characters" in aborted.reason
        # The next placement's vote is answered right: p1 owns web.
        wait_until(lambda: owner(port) == "p1", 20, "web placed on p1 with a right vote")
        assert s1.rejects.empty()
        # Every command carried the controller's incarnation, and its id too.
        incarnations = {c.incarnation for c in p1.commands + s1.commands}
        assert len(incarnations) == 1 and all(
            c.command_id.startswith(f"{c.incarnation}-") for c in p1.commands + s1.commands
        )
    finally:
        p1.close()
        s1.close()


def test_a_late_result_for_an_earlier_controller_is_refused(controller: tuple[Daemon, int]) -> None:
    ctl, port = controller
    s1 = Agent(port, "s1", tpb.ROLE_SHADOW)
    watch = wait_until(lambda: next((c for c in s1.commands if c.HasField("watch")), None), 10, "a watch")
    assert isinstance(watch, apb.Command)
    s1.close()
    ctl.stop()
    ctl.start()  # a new controller incarnation, same store
    wait_for_port("127.0.0.1", port, 20, ctl.proc)
    s1 = Agent(port, "s1", tpb.ROLE_SHADOW)
    try:
        again = wait_until(lambda: next((c for c in s1.commands if c.HasField("watch")), None), 10, "a watch")
        assert isinstance(again, apb.Command) and again.incarnation != watch.incarnation
        assert again.command_id != watch.command_id
        # The earlier controller's command, answered late: with its incarnation, then as an agent that echoes
        # none would (the id carries it).
        late = right(watch)
        s1.send(apb.AgentMessage(result=late))
        rej = s1.reject()
        assert (rej.kind, rej.field, rej.reason_code) == ("result", "result.incarnation", "stale_incarnation")
        late.incarnation = ""
        s1.send(apb.AgentMessage(result=late))
        assert s1.reject().reason_code == "stale_incarnation"
        # A result of this controller for a command it never sent (or that timed out): refused too.
        s1.send(apb.AgentMessage(result=apb.CommandResult(command_id=f"{again.incarnation}-999", ok=True)))
        assert s1.reject().reason_code == "unknown_command"
        assert ctl.alive()
    finally:
        s1.close()
