"""Bad input never kills a daemon or another agent's stream: it is refused with a reason."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lab.procs import free_port, wait_for_port
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb
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


def telemetry(seq: int, workload: str = "web", pad: int = 0) -> apb.AgentMessage:
    s = tpb.WorkloadSample(
        workload=workload, cgroup="/w", start_unix_ms=1_000 * seq, end_unix_ms=1_000 * (seq + 1)
    )
    if pad:
        s.syscalls.by_name["x" * pad] = 1
    return apb.AgentMessage(telemetry=apb.TelemetryBatch(seq=seq, samples=[s]))


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\nmax_message_bytes = 262144\n[store]\npath = "{tmp_path}/c.db"\n'
        '[[host]]\nname = "good"\n[[host]]\nname = "bad"\n' + PLAINTEXT
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        yield port
        assert d.alive(), "the controller survived everything"
    finally:
        d.stop()


def test_bad_messages_are_refused_and_other_streams_continue(controller: int) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{controller}")
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

    # 2. Bytes that are not a protobuf message, on another agent's stream: that stream dies, alone.
    garbage = ScriptedAgent(ch, serialize=False)
    garbage.send(b"\xff\xff\xff\xff not protobuf")
    err = garbage.reply()
    assert isinstance(err, grpc.RpcError)

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


def test_repro_one_bad_batch(controller: int) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{controller}")
    good = ScriptedAgent(ch)
    good.send(hello("good"))
    good.reply()
    m = telemetry(1)
    m.telemetry.samples[0].resources.memory_bytes = 2**63
    good.send(m)
    print(good.reply())
    m = telemetry(2)
    m.telemetry.samples[0].resources.cpu_seconds = float("nan")
    good.send(m)
    print(good.reply())
