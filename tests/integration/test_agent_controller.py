"""A real controller and a real agent, each its own process, over a real TCP socket."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from agentd.capture.kernel_features import FEATURES
from lab.procs import free_port, wait_for_port
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from tests.support import PLAINTEXT, Daemon, Workload, need_root, wait_until

INTERVAL = 0.5


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(f'listen = "127.0.0.1:{port}"\n[store]\npath = "{tmp_path}/controller.db"\n' + PLAINTEXT)
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        yield d, port
    finally:
        d.stop()


@pytest.fixture
def agent(tmp_path: Path, controller: tuple[Daemon, int], workload_cgroup: Workload) -> Iterator[Daemon]:
    need_root()
    _, port = controller
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(
        f'controller = "127.0.0.1:{port}"\nhost = "it-host"\ninterval_seconds = {INTERVAL}\n'
        f"reconnect_max_seconds = 0.5\n"
        f'[[workload]]\nname = "web"\ncgroup = "{workload_cgroup.path}"\nrole = "primary"\nservice = "web"\n'
        + PLAINTEXT
    )
    d = Daemon("agentd.cli", cfg, tmp_path / "agentd.log").start()
    try:
        yield d
    finally:
        d.stop()


def fleet_stub(port: int) -> tuple[grpc.Channel, fgrpc.FleetStub]:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    return ch, fgrpc.FleetStub(ch)


def samples(port: int) -> list[fpb.StoredSample]:
    ch, stub = fleet_stub(port)
    with ch:
        return list(
            stub.GetTelemetry(fpb.GetTelemetryRequest(host="it-host", limit=10_000), timeout=5).samples
        )


def test_telemetry_survives_controller_restart_without_duplicates(
    controller: tuple[Daemon, int], agent: Daemon, workload_cgroup: Workload
) -> None:
    ctl, port = controller
    load = workload_cgroup.popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=1000000000"])
    try:
        wait_until(lambda: len(samples(port)) >= 4, 30, "first samples", 0.2)
        before = len(samples(port))
        ctl.stop()  # the controller goes away for a while; the agent keeps sampling into its backlog
        import time

        time.sleep(6 * INTERVAL)
        ctl.start()
        wait_for_port("127.0.0.1", port, 20, ctl.proc)
        wait_until(lambda: len(samples(port)) >= before + 8, 30, "backlog and new samples", 0.2)
    finally:
        load.kill()
        load.wait()
    got = [s.sample for s in samples(port)]
    ends = [s.end_unix_ms for s in got]
    assert ends == sorted(set(ends)), "each interval stored once"
    # Contiguity: every sample starts where the previous ended, so nothing sampled while the controller was
    # down was lost.
    for prev, cur in itertools.pairwise(got):
        assert cur.start_unix_ms == prev.end_unix_ms
    assert sum(s.syscalls.total for s in got) > 100_000  # the dd in the workload was captured (BPF)
    assert "agent it-host connected" in ctl.log_text()


def test_hosts_and_top_report_the_agent(controller: tuple[Daemon, int], agent: Daemon) -> None:
    _, port = controller
    wait_until(lambda: len(samples(port)) >= 2, 30, "samples")
    env_cmd = [sys.executable, "-m", "shadowctl.cli", "--plaintext", "--controller", f"127.0.0.1:{port}"]
    out = subprocess.run([*env_cmd, "hosts", "--json"], capture_output=True, text=True, check=True)
    (host,) = json.loads(out.stdout)
    assert host["host"] == "it-host" and host["health"] == "healthy" and host["connected"]
    assert host["workloads"][0]["role"] == "primary"
    # what the agent's kernel lets it capture reaches the operator, feature by feature
    assert host["bpf"] is True
    assert [f["name"] for f in host["capture_features"]] == [f.name for f in FEATURES]
    assert all(f["detail"] for f in host["capture_features"])
    # the table an operator reads (what the first hour runs), not only --json
    table = subprocess.run([*env_cmd, "hosts"], capture_output=True, text=True)
    assert table.returncode == 0 and "it-host" in table.stdout and "healthy" in table.stdout, table.stderr
    out = subprocess.run([*env_cmd, "top", "--json"], capture_output=True, text=True, check=True)
    (row,) = json.loads(out.stdout.splitlines()[0])
    assert row["workload"] == "web" and row["host"] == "it-host"
    assert row["memory_bytes"] >= 0 and row["age_seconds"] < 10
    agent.stop()
    wait_until(
        lambda: (
            json.loads(subprocess.run([*env_cmd, "hosts", "--json"], capture_output=True, text=True).stdout)[
                0
            ]["health"]
            == "down"
        ),
        10,
        "host marked down after its agent stops",
    )


def test_health_and_reflection_for_grpcurl(controller: tuple[Daemon, int]) -> None:
    _, port = controller
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"shadowplane.v1.Fleet", "shadowplane.v1.AgentStream", "grpc.health.v1.Health"} <= services


def test_shadowctl_reports_unreachable_controller_and_missing_credentials() -> None:
    port = free_port()
    base = [sys.executable, "-m", "shadowctl.cli", "--controller", f"127.0.0.1:{port}", "--timeout", "1"]
    out = subprocess.run([*base, "--plaintext", "hosts"], capture_output=True, text=True)
    assert out.returncode == 1 and "unreachable" in out.stderr
    # without --plaintext, shadowctl insists on TLS credentials and says how to get them
    out = subprocess.run(
        [*base, "--ca", "/nonexistent/ca.pem", "hosts"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "shadowctl certs issue" in out.stderr and "--plaintext" in out.stderr
