"""Exec health checks between a real controller and a real agent, each its own process: the controller's Watch
names the check, the agent runs its own [checks.NAME] command, or says which table to add.

The service is DNS-only (no VIP) with a placement grace of an hour: nothing here may add an address to this
machine, whatever the controller decides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lab.procs import free_port, wait_for_port
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from tests.support import PLAINTEXT, Daemon, wait_until


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\n[store]\npath = "{tmp_path}/controller.db"\n'
        + PLAINTEXT
        + "[failover]\nplacement_grace_seconds = 3600\n"
        + '[[host]]\nname = "p1"\naddress = "127.0.0.1"\n'
        + '[[host]]\nname = "it-host"\naddress = "127.0.0.1"\n'
        + '[[service]]\nname = "web"\nprimary = "p1"\nshadows = ["it-host"]\nfailback = "never"\n'
        + "[service.health]\n"
        + 'kind = "exec"\ncheck = "web-ok"\ninterval_seconds = 0.2\nfall = 1\nrise = 1\ntimeout_seconds = 5\n'
        + f'[service.dns]\nserver = "127.0.0.1:{free_port()}"\nzone = "lab.example."\nname = "web"\n'
        + '[checks.web-ok]\ncommand = ["/bin/true"]\n'
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", port, 20, d.proc)
        yield port
    finally:
        d.stop()


def start_agent(tmp_path: Path, port: int, checks: str) -> Daemon:
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(
        f'controller = "127.0.0.1:{port}"\nhost = "it-host"\nreconnect_max_seconds = 0.5\n'
        f'peer_listen = "127.0.0.1:{free_port()}"\n[capture]\nbpf = false\n' + PLAINTEXT + checks
    )
    return Daemon("agentd.cli", cfg, tmp_path / "agentd.log").start()


def view_of_p1(port: int) -> fpb.ObserverView | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        (svc,) = fgrpc.FleetStub(ch).ListServices(fpb.ListServicesRequest(), timeout=5).services
    return next((o for o in svc.observers if o.observer == "it-host" and o.target == "p1"), None)


def test_the_agent_runs_its_own_command_or_says_what_to_add(tmp_path: Path, controller: int) -> None:
    agent = start_agent(tmp_path, controller, "")
    try:
        v = wait_until(
            lambda: (o := view_of_p1(controller)) is not None and "checks" in o.detail and o,
            30,
            "the agent's report that it has no such check",
        )
        assert isinstance(v, fpb.ObserverView) and not v.known
        assert f"add [checks.web-ok] with its command to {tmp_path / 'agentd.toml'}" in v.detail
    finally:
        agent.stop()

    seen = tmp_path / "seen"
    script = tmp_path / "check-web"
    script.write_text(f'#!/bin/sh\necho "$SHADOWPLANE_TARGET_ADDRESS" >> {seen}\nexit 1\n')
    script.chmod(0o755)
    agent = start_agent(tmp_path, controller, f'[checks.web-ok]\ncommand = ["{script}"]\n')
    try:
        v = wait_until(
            lambda: (o := view_of_p1(controller)) is not None and o.known and o,
            30,
            "the agent's own check of p1",
        )
        assert isinstance(v, fpb.ObserverView) and not v.up and v.detail == "exit 1"
        assert seen.read_text().splitlines()[0] == "127.0.0.1"
    finally:
        agent.stop()
