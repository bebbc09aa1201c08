"""An agent restart, as systemd runs it, against three real observer gRPC servers, in a namespace this test
creates: the agent acquires a lease and its VIP, stops (SIGTERM's path: `Agent.close`), systemd's
`release-all` runs, and a new agent starts. The VIP stays only while the observers still grant the very
token that was recorded, on this boot: never for a token they voted past (a failover happened meanwhile:
two owners) or a record of another boot."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.config import ControllerConfig, HostEntry, ServiceConfig
from controller.event_log import EventLog
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry
from controller.store.sqlite import SqliteStore
from shadowplane.config import build
from shadowplane.healthcheck import Tracker
from tests.support import veth_namespace

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, dataclasses, json, sys, time
from pathlib import Path
from agentd import held_leases
from agentd.actuate.address import Addresses, Vip
from agentd.cli import release_all
from agentd.config import load_agent_config
from agentd.daemon import Agent
from shadowplane.v1 import agent_pb2 as apb
from tests.lease_observers import serve_observers

case, workdir = sys.argv[1], Path(sys.argv[2])
VIP, LEASE_MS = "10.89.0.100/24", 2000


async def main() -> dict:
    roles, servers, addrs = await serve_observers(3, LEASE_MS, token=2)
    cfg_path = workdir / "agentd.toml"
    cfg_path.write_text(
        f'host = "p1"\ncontroller = "127.0.0.1:9"\nlease_state_file = "{workdir}/run/leases.json"\n'
        '[tls]\nplaintext = true\n[capture]\nbpf = false\n'
    )
    cfg = load_agent_config(cfg_path)
    vip, probe, out = Vip.parse(VIP, "eth0"), Addresses(), {}

    first = Agent(cfg, str(cfg_path))
    await first.start_failover_roles()
    await first.commands.acquire(apb.Acquire(
        service="web", token=2, vip=VIP, interface="eth0", observers=addrs,
        observer_names=["o0", "o1", "o2"], lease_ms=LEASE_MS, renew_interval_ms=100, drift_margin=0.05,
        garp_count=1, garp_interval_ms=10,
    ))
    await first.close()  # what SIGTERM runs
    stopped = time.monotonic()
    # a planned move's release reaching the stopping agent: it must not confirm "holds none"
    late = await first.commands(apb.Command(release=apb.Release(service="web", token=2)))
    out["late_release"] = [late.ok, late.address.holds_address]
    out["held_after_stop"] = probe.has(vip)
    out["recorded"] = [h.token for h in held_leases.peek(cfg.lease_state_file)]

    if case == "superseded":  # the controller failed over meanwhile: the observers voted token 3 for s1
        for role in roles:
            assert role.vote(apb.Vote(service="web", token=3, candidate="s1")).granted
    elif case == "other-boot":
        recorded = held_leases.peek(cfg.lease_state_file)
        held = [dataclasses.replace(h, boot_id="another-boot") for h in recorded]
        held_leases.save(cfg.lease_state_file, held)
    elif case == "no-record":  # the agent died without a clean stop
        cfg.lease_state_file.unlink()

    release_all(str(cfg_path), everything=False)  # systemd's ExecStopPost
    out["held_after_release_all"] = probe.has(vip)

    second = Agent(cfg, str(cfg_path))
    await second.start_failover_roles()
    out["resumed"] = "web" in second.commands.holders
    out["held_after_start"] = probe.has(vip)
    out["events"] = [m.lease_event.what for m in second.link.links[0]._outbox if m.HasField("lease_event")]
    out["record_left"] = cfg.lease_state_file.exists()
    # Past the first run's lease and address lifetime (2 s + the kernel's second): kept only by renewals.
    await asyncio.sleep(max(0.0, stopped + 3.5 - time.monotonic()))
    out["held_later"] = probe.has(vip)
    out["renewing_with"] = [r.leases.state("web").granted_token for r in roles]
    await second.close()
    probe.close()
    for server in servers:
        await server.stop(0)
    return out


print(json.dumps(asyncio.run(main())))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with veth_namespace("rs", "eth0", "eth0-peer", "10.89.0.1/24") as ns:  # eth0 carries the VIP
        yield ns


def restart(ns: str, case: str, workdir: Path) -> dict[str, object]:
    r = subprocess.run(
        # nsenter, not `ip netns exec`: that remounts /sys without the cgroup hierarchies the agent reads
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", SCRIPT, case, str(workdir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_a_restart_keeps_the_vip_while_the_observers_grant_the_token(netns: str, tmp_path: Path) -> None:
    out = restart(netns, "granted", tmp_path)
    assert out["held_after_stop"] is True, "a stopping agent leaves its VIP to the kernel's lifetime"
    assert out["recorded"] == [2]
    assert out["late_release"] == [False, False], "a stopping agent confirms no release: its VIP stays"
    assert out["held_after_release_all"] is True, "release-all keeps what the stopped agent recorded"
    assert out["resumed"] is True and out["held_after_start"] is True
    assert out["events"] == ["resumed"], "the controller hears the lease was resumed, not acquired"
    assert out["record_left"] is False, "the record is taken: resumed at most once"
    assert out["held_later"] is True, "the resumed owner keeps renewing, which keeps the address"
    assert out["renewing_with"] == [2, 2, 2]


@pytest.mark.parametrize("case", ["superseded", "other-boot", "no-record"])
def test_a_restart_drops_the_vip_it_may_not_hold(netns: str, tmp_path: Path, case: str) -> None:
    out = restart(netns, case, tmp_path)
    assert out["held_after_stop"] is True
    assert out["resumed"] is False and out["held_after_start"] is False, out
    assert out["held_later"] is False
    if case == "superseded":
        # release-all cannot know a vote happened: the start asks the observers, who refuse token 2
        assert out["held_after_release_all"] is True
        assert out["events"] == ["lost"], out
    else:
        assert out["held_after_release_all"] is False, "release-all keeps only a record of this boot"


def test_the_controller_counts_no_agent_down_before_one_heartbeat_timeout(tmp_path: Path) -> None:
    """A controller that just restarted has not heard from its agents yet: that says nothing about them."""
    cfg = ControllerConfig(
        host=[HostEntry("p1", address="10.0.0.1"), HostEntry("s1", address="10.0.0.2")],
        service=[
            build(ServiceConfig, {"name": "web", "primary": "p1", "shadows": ["s1"], "vip": "10.0.0.100/24"})
        ],
    )
    store = SqliteStore(tmp_path / "c.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    loop = FailoverLoop(
        cfg, store, registry, events, observer, Orchestrator(cfg, store, registry, events, observer)
    )
    tracker = Tracker(1, 1)
    tracker.up = True  # its health check of p1 passes
    loop._checks[("web", "p1")] = tracker
    up, detail = loop._controller_view("web", "p1")
    assert up is None and "just started" in detail
    loop.started = time.monotonic() - cfg.failover.heartbeat_timeout_seconds - 0.01
    assert loop._controller_view("web", "p1") == (False, "agent not connected")
