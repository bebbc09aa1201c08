"""Mutual TLS between shadowctl, agents and the controller: who is refused, and that nothing changes."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lab.procs import free_port, wait_for_port
from shadowplane.pki import init_ca, issue
from shadowplane.tls import TlsConfig, sync_channel
from shadowplane.v1 import agent_pb2 as apb
from tests.support import Daemon


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    init_ca(d)
    issue(d, "ctl", "controller", ("127.0.0.1",))
    issue(d, "web-1", "agent")
    issue(d, "alice", "operator")
    # the same CA, in a directory of its own, issues a certificate that expired nine days ago
    (d / "expired").mkdir()
    for f in ("ca.pem", "ca.key"):
        (d / "expired" / f).write_bytes((d / f).read_bytes())
    issue(
        d / "expired", "bob", "operator", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10), days=1
    )
    other = tmp_path / "other-ca"
    init_ca(other, name="Somebody else's CA")
    issue(other, "mallory", "operator")
    return d


@pytest.fixture
def controller(tmp_path: Path, pki: Path) -> Iterator[int]:
    port = free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\n[store]\npath = "{tmp_path}/c.db"\n'
        f'[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/controller-ctl.pem"\nkey = "{pki}/controller-ctl.key"\n'
        '[[host]]\nname = "web-1"\naddress = "127.0.0.1"\n[[host]]\nname = "web-2"\naddress = "127.0.0.1"\n'
        '[[service]]\nname = "web"\nprimary = "web-1"\nshadows = ["web-2"]\nvip = "10.99.0.1/24"\n'
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        yield port
        assert d.alive()
    finally:
        d.stop()


def shadowctl(port: int, ca: Path, cert: Path, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shadowctl.cli",
            "--controller",
            f"127.0.0.1:{port}",
            "--timeout",
            "3",
            "--ca",
            str(ca),
            "--cert",
            str(cert),
            "--key",
            str(key),
            *args,
        ],
        capture_output=True,
        text=True,
    )


def events(port: int, pki: Path) -> list[str]:
    """Every event but the controller's own health checks (web-1 has no server: they turn it DOWN a few
    seconds after start, whatever the test does)."""
    out = shadowctl(
        port,
        pki / "ca.pem",
        pki / "operator-alice.pem",
        pki / "operator-alice.key",
        "events",
        "--json",
        "-n",
        "1000",
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if json.loads(line)["kind"] != "health"]


def test_operator_reads_and_changes_agent_cert_only_reads(controller: int, pki: Path) -> None:
    ca = pki / "ca.pem"
    ok = shadowctl(
        controller, ca, pki / "operator-alice.pem", pki / "operator-alice.key", "services", "--json"
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["name"] == "web"
    before = events(controller, pki)
    # an agent's certificate reads fine ...
    out = shadowctl(controller, ca, pki / "agent-web-1.pem", pki / "agent-web-1.key", "services", "--json")
    assert out.returncode == 0
    # ... but may not change anything
    out = shadowctl(
        controller, ca, pki / "agent-web-1.pem", pki / "agent-web-1.key", "failover", "web", "--force"
    )
    assert out.returncode == 1
    assert "PERMISSION_DENIED" in out.stderr and "needs an operator certificate" in out.stderr
    assert events(controller, pki) == before, "a refused call changes nothing"
    # the operator's failover request reaches the decision (refused there: no agents are connected)
    out = shadowctl(controller, ca, pki / "operator-alice.pem", pki / "operator-alice.key", "failover", "web")
    assert out.returncode == 3 and "refused:" in out.stdout


def test_wrong_ca_and_expired_certificates_are_refused(controller: int, pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    out = shadowctl(
        controller, other / "ca.pem", other / "operator-mallory.pem", other / "operator-mallory.key", "hosts"
    )
    assert out.returncode == 1 and "TLS settings" in out.stderr
    # our CA, their certificate: the controller rejects the client
    out = shadowctl(
        controller,
        pki / "ca.pem",
        other / "operator-mallory.pem",
        other / "operator-mallory.key",
        "failover",
        "web",
        "--force",
    )
    assert out.returncode == 1
    exp = pki / "expired"
    out = shadowctl(
        controller,
        pki / "ca.pem",
        exp / "operator-bob.pem",
        exp / "operator-bob.key",
        "failover",
        "web",
        "--force",
    )
    assert out.returncode == 1
    assert len(events(controller, pki)) == 0


def test_agent_must_present_its_own_certificate(controller: int, pki: Path) -> None:
    def connect(cert: str, host: str) -> grpc.RpcError | apb.ControllerMessage:
        tls = TlsConfig(ca=pki / "ca.pem", cert=pki / f"{cert}.pem", key=pki / f"{cert}.key")
        with sync_channel(f"127.0.0.1:{controller}", tls) as ch:
            call = ch.stream_stream(
                "/shadowplane.v1.AgentStream/Connect",
                request_serializer=apb.AgentMessage.SerializeToString,
                response_deserializer=apb.ControllerMessage.FromString,
            )
            hello = apb.AgentMessage(hello=apb.Hello(host=host, instance_id="x"))
            try:
                return next(iter(call(iter([hello]), timeout=5)))
            except grpc.RpcError as e:
                return e

    ok = connect("agent-web-1", "web-1")
    assert isinstance(ok, apb.ControllerMessage) and ok.HasField("welcome")
    err = connect("agent-web-1", "web-2")  # web-1's certificate claiming to be web-2
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate names host 'web-1'" in (err.details() or "")
    err = connect("operator-alice", "web-1")
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_controller_without_tls_settings_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = "127.0.0.1:1"\n')
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "tls.ca: TLS needs ca, cert and key" in out.stderr
