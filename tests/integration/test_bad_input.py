"""Bad input never kills a daemon or another agent's stream: it is refused with a reason."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agentd.link import Backlog, ControllerLink
from lab.procs import free_port, wait_for_port
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import telemetry_pb2 as tpb
from tests.integration.test_metrics_http import scrape, series
from tests.support import PLAINTEXT, Daemon

AGENT_STREAM = "/shadowplane.v1.AgentStream/Connect"


class ScriptedAgent:
    """An agent stream driven message by message from the test."""

    def __init__(self, channel: grpc.Channel, serialize: bool = True) -> None:
        self.requests: queue.Queue[object] = queue.Queue()
        method = channel.stream_stream(
            AGENT_STREAM,
            request_serializer=(lambda m: m.SerializeToString()) if serialize else (lambda b: b),
            response_deserializer=apb.ControllerMessage.FromString,
        )
        self.responses = method(iter(self.requests.get, None))
        self.replies: queue.Queue[apb.ControllerMessage | Exception] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for r in self.responses:
                self.replies.put(r)
        except grpc.RpcError as e:
            self.replies.put(e)

    def send(self, msg: object) -> None:
        self.requests.put(msg)

    def reply(self, timeout: float = 5.0) -> apb.ControllerMessage | Exception:
        return self.replies.get(timeout=timeout)

    def close(self) -> None:
        self.requests.put(None)


def hello(host: str) -> apb.AgentMessage:
    return apb.AgentMessage(
        hello=apb.Hello(
            host=host, instance_id=f"{host}-1", workloads=[tpb.WorkloadInfo(name="web", cgroup="/w")]
        )
    )


def sample(seq: int, workload: str = "web") -> tpb.WorkloadSample:
    # 2020-09-13 onwards, a second per batch: in the past, as every real sample is
    start = 1_600_000_000_000 + 1_000 * seq
    return tpb.WorkloadSample(workload=workload, cgroup="/w", start_unix_ms=start, end_unix_ms=start + 1_000)


def telemetry(seq: int, workload: str = "web", pad: int = 0) -> apb.AgentMessage:
    s = sample(seq, workload)
    if pad:
        s.syscalls.by_name["x" * 60] = 1
        s.cgroup = "/" + "x" * pad
    return apb.AgentMessage(telemetry=apb.TelemetryBatch(seq=seq, samples=[s]))


@dataclass(frozen=True)
class Controller:
    daemon: Daemon
    port: int
    metrics_port: int

    def stored(self, host: str) -> list[tpb.WorkloadSample]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            req = fpb.GetTelemetryRequest(host=host, limit=10_000)
            return [s.sample for s in fgrpc.FleetStub(ch).GetTelemetry(req, timeout=5).samples]

    def host(self, name: str) -> fpb.HostStatus:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            hosts = fgrpc.FleetStub(ch).ListHosts(fpb.ListHostsRequest(), timeout=5).hosts
        return next(h for h in hosts if h.host == name)

    def rejected(self) -> dict[str, float]:
        return series(scrape(self.metrics_port), "shadowplane_controller_agent_messages_rejected_total")


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    port, metrics_port = free_port(), free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\nmax_message_bytes = 262144\n[store]\npath = "{tmp_path}/c.db"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        '[[host]]\nname = "good"\n[[host]]\nname = "bad"\n' + PLAINTEXT
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        wait_for_port("127.0.0.1", metrics_port, 20, d.proc)
        yield Controller(d, port, metrics_port)
        assert d.alive(), "the controller survived everything"
    finally:
        d.stop()


def test_bad_messages_are_refused_and_other_streams_continue(controller: Controller) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{controller.port}")
    good = ScriptedAgent(ch)
    good.send(hello("good"))
    welcome = good.reply()
    assert isinstance(welcome, apb.ControllerMessage) and welcome.HasField("welcome")
    good.send(telemetry(1))
    assert good.reply().ack.seq == 1  # type: ignore[union-attr]

    # 1. A batch naming a workload the agent never announced: rejected with the field, stream stays up.
    good.send(telemetry(2, workload="ghost"))
    rej = good.reply()
    assert isinstance(rej, apb.ControllerMessage)
    assert rej.reject.seq == 2 and rej.reject.field == "samples[0].workload"
    assert (rej.reject.kind, rej.reject.reason_code) == ("telemetry", "unknown_workload")

    # 2. Bytes that are not a protobuf message, on another agent's stream: that stream dies, alone.
    garbage = ScriptedAgent(ch, serialize=False)
    garbage.send(b"\xff\xff\xff\xff not protobuf")
    err = garbage.reply()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an AgentMessage" in (err.details() or "")

    # 3. An oversized message (above max_message_bytes): refused with RESOURCE_EXHAUSTED.
    big = ScriptedAgent(ch)
    big.send(hello("bad"))
    assert isinstance(big.reply(), apb.ControllerMessage)
    big.send(telemetry(1, pad=400_000))
    err = big.reply()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # 4. A host the controller does not know is refused with the reason.
    stranger = ScriptedAgent(ch)
    stranger.send(hello("intruder"))
    err = stranger.reply()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not in the controller's [[host]] list" in (err.details() or "")

    # 5. A stream that starts with telemetry instead of hello.
    rude = ScriptedAgent(ch)
    rude.send(telemetry(1))
    err = rude.reply()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The first agent's stream carries on through all of it.
    good.send(telemetry(3))
    assert good.reply().ack.seq == 3  # type: ignore[union-attr]
    good.close()
    ch.close()
    assert controller.rejected() == {
        '{host="good",kind="telemetry",reason="unknown_workload"}': 1.0,
        '{host="",kind="hello",reason="unknown_host"}': 1.0,
        '{host="",kind="telemetry",reason="unexpected"}': 1.0,
        '{host="",kind="undecodable",reason="undecodable"}': 1.0,
    }


def bad_batches() -> list[tuple[tpb.WorkloadSample, str]]:
    """Samples with one garbage value each, and the reason code the controller gives."""
    out = []
    s = sample(2)
    s.resources.cpu_seconds = float("nan")
    out.append((s, "not_finite"))
    s = sample(3)
    s.resources.memory_bytes = 2**63  # SQLite's INTEGER ends at 2^63-1
    out.append((s, "too_large"))
    s = sample(4)
    s.start_unix_ms = int(time.time() * 1000) + 3_600_000  # an agent whose clock is an hour ahead
    s.end_unix_ms = s.start_unix_ms + 1_000
    out.append((s, "future"))
    s = sample(5)
    s.end_unix_ms = s.start_unix_ms - 10
    out.append((s, "bad_interval"))
    return out


def test_the_agent_drops_a_rejected_batch_counts_it_and_keeps_its_stream(controller: Controller) -> None:
    """Before issue 10, a batch with a NaN or a counter of 2^63 ended the stream (SQLite raised in the
    controller), the agent reconnected and resent it forever, and its host flapped. Now: refused alone."""
    hello = apb.Hello(
        host="good",
        instance_id="good-7",
        workloads=[tpb.WorkloadInfo(name="web", cgroup="/w")],
        interval_ms=1000,
    )
    bad = bad_batches()

    async def run() -> tuple[ControllerLink, fpb.HostStatus]:
        link = ControllerLink(
            f"127.0.0.1:{controller.port}", lambda: hello, Backlog(100), heartbeat_seconds=0.2
        )
        task = asyncio.create_task(link.run())
        link.submit(apb.TelemetryBatch(seq=1, samples=[sample(1)]))
        for seq, (s, _) in enumerate(bad, start=2):
            link.submit(apb.TelemetryBatch(seq=seq, samples=[s]))
        last = len(bad) + 2
        link.submit(apb.TelemetryBatch(seq=last, samples=[sample(last)]))
        deadline = asyncio.get_running_loop().time() + 20
        while len(link.backlog) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # heartbeats go on: a stream that was to fail would fail now
        host = await asyncio.to_thread(controller.host, "good")
        task.cancel()
        return link, host

    link, host = asyncio.run(run())
    assert len(link.backlog) == 0, "every batch was acknowledged or rejected, none is resent"
    assert link.state.sessions == 1 and link.state.connected, (
        f"one stream throughout ({link.state.last_error})"
    )
    assert link.state.rejected == {("telemetry", code): 1 for _, code in bad}
    assert "samples[0].end_unix_ms" in link.state.last_rejected
    # Nothing good was lost: the batches before and after the bad ones are stored.
    assert [s.start_unix_ms for s in controller.stored("good")] == [
        sample(1).start_unix_ms,
        sample(6).start_unix_ms,
    ]
    assert host.connected and host.health != fpb.HOST_HEALTH_DOWN
    assert controller.rejected() == {
        f'{{host="good",kind="telemetry",reason="{code}"}}': 1.0 for _, code in bad
    }


@pytest.mark.parametrize("module", ["agentd.cli", "controller.cli"])
def test_bad_config_file_is_refused_naming_the_field(tmp_path: Path, module: str) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("listen = 7400\n" if module == "controller.cli" else 'interval_seconds = "often"\n')
    out = subprocess.run(
        [sys.executable, "-m", module, "check-config", "--config", str(cfg)], capture_output=True, text=True
    )
    assert out.returncode == 2
    field = "listen" if module == "controller.cli" else "interval_seconds"
    assert f"{cfg}: {field}: must be" in out.stderr
