"""What an agent logs when it takes a service: the address and the interface it really went on, also when
the controller's Acquire names no interface and the host's workload config says which. Real observers (gRPC
on loopback), a real address on a veth in a namespace this test creates."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import veth_namespace

ROOT = Path(__file__).resolve().parents[2]

IFACE = "sp-ux0"  # not eth0: the holder's fallback name must not pass for the resolved one

# Runs inside the namespace: the agent's command handler, three observers, an Acquire without interface.
SCENARIO = r"""
import asyncio, json, logging, sys, tempfile
from pathlib import Path
from agentd.actuate.address import Vip
from agentd.cgroupfs import CgroupLayout
from agentd.commands import CommandHandler
from agentd.config import AgentConfig, WorkloadConfig
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from tests.lease_observers import serve_observers

LEASE_MS, VIP, IFACE = 300, sys.argv[1], sys.argv[2]
messages = []

class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

logging.getLogger("agentd.commands").addHandler(Keep())
logging.getLogger("agentd.commands").setLevel(logging.INFO)

async def main():
    roles, servers, addrs = await serve_observers(3, LEASE_MS)
    tmp = Path(tempfile.mkdtemp())
    cfg = AgentConfig(host="p1", hooks_dir=tmp, tls=TlsConfig(plaintext=True), workload=[
        WorkloadConfig(name="web", cgroup="/web", role="primary", service="web", interface=IFACE)])
    handler = CommandHandler(cfg, CgroupLayout(tmp, "v2", tmp), roles[0], report=lambda m: None)
    acq = apb.Acquire(service="web", token=1, vip=VIP, observers=addrs, observer_names=["o0", "o1", "o2"],
                      lease_ms=LEASE_MS, renew_interval_ms=50, drift_margin=0.05, garp_count=1,
                      garp_interval_ms=10)
    try:
        state = await handler.acquire(acq)
        on_iface = handler.addresses.has(Vip.parse(VIP, IFACE))
    finally:
        await handler.close()
        for s in servers:
            await s.stop(0)
    print(json.dumps({"holds": state.holds_address, "on_iface": on_iface, "messages": messages}))

asyncio.run(main())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with veth_namespace("acq", IFACE, "sp-ux1") as ns:
        yield ns


def test_acquired_log_line_names_the_interface_the_address_went_on(netns: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SCENARIO, "10.0.2.100/24", IFACE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,  # the scenario imports tests.lease_observers
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["holds"] and r["on_iface"], r
    assert f"service web: acquired token 1, 10.0.2.100/24 on {IFACE}" in r["messages"], r["messages"]
