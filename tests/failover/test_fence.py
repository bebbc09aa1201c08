"""Self-fencing does not depend on the agent's event loop: with the loop blocked, the owner's address is
gone before the coordinator lets a new owner add it. Real observers (gRPC on loopback), a real address on a
veth in a namespace this test creates."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.actuate.fence import Fence
from tests.support import veth_namespace

ROOT = Path(__file__).resolve().parents[2]

# Runs inside the namespace: an owner with three observers, then a vote for a newer token at two of them
# (what the coordinator does to move the service), and the owner's event loop blocked for three leases right
# then. A thread samples the address every millisecond.
SCENARIO = r"""
import asyncio, json, sys, threading, time
from agentd.actuate.address import Addresses, Vip
from agentd.actuate.fence import Fence
from agentd.failover import Channels, LeaseHolder
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from tests.lease_observers import serve_observers

LEASE_MS, VIP = 300, sys.argv[1]

async def main():
    roles, servers, addrs = await serve_observers(3, LEASE_MS)
    addresses = Addresses()
    vip = Vip.parse(VIP, "eth0")
    acq = apb.Acquire(service="web", token=1, vip=VIP, interface="eth0", observers=addrs,
                      observer_names=["o0", "o1", "o2"], lease_ms=LEASE_MS, renew_interval_ms=50,
                      drift_margin=0.05, garp_count=1, garp_interval_ms=10)
    fence = Fence(addresses)
    h = LeaseHolder("p1", acq, addresses, Channels(TlsConfig(plaintext=True), ""), lambda m: None, fence)
    await h.start()
    held_at_start = addresses.has(vip)
    await asyncio.sleep(0.5)
    seen = []
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            seen.append((time.monotonic(), addresses.has(vip)))
            time.sleep(0.001)
    sampler = threading.Thread(target=sample); sampler.start()
    await asyncio.sleep(0.05)
    # the coordinator's vote: from now on the old owner's renewals are refused by a majority
    voted_at = time.monotonic()
    waits = [roles[i].vote(apb.Vote(service="web", token=2, candidate="s1")) for i in (0, 1)]
    new_owner_may_add = voted_at + max(w.wait_ms for w in waits) / 1000
    # ... and the owner's loop is blocked: no timer, no renewal, no callback runs for three leases
    time.sleep(3 * LEASE_MS / 1000)
    unblocked_at = time.monotonic()
    stop.set(); sampler.join()
    last_held = max((t for t, held in seen if held), default=0.0)
    print(json.dumps({
        "held_at_start": held_at_start,
        "held_when_blocked": seen[0][1],
        "last_held_before_new_owner": last_held - new_owner_may_add,
        "gone_before_unblocked": last_held < unblocked_at and not seen[-1][1],
        "samples": len(seen),
    }))
    fence.close()
    for s in servers:
        await s.stop(0)
    await h.channels.close()
    addresses.close()

asyncio.run(main())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with veth_namespace("fence", "eth0", "eth1", "10.89.0.1/24") as ns:
        yield ns


def test_owner_drops_its_address_with_its_event_loop_blocked(netns: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SCENARIO, "10.89.0.100/24"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,  # the scenario imports tests.lease_observers
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["held_at_start"] and r["held_when_blocked"], r
    assert r["gone_before_unblocked"], f"the address outlived a lease with the loop blocked: {r}"
    # Zero overlap: not one sample shows the address once the coordinator may let the new owner add it.
    assert r["last_held_before_new_owner"] < 0, r


def test_fence_fires_on_its_own_thread_and_never_re_adds_after_the_deadline() -> None:
    fired: list[tuple[bool, str]] = []
    done = threading.Event()

    def expired(removed: bool) -> None:
        fired.append((removed, threading.current_thread().name))
        done.set()

    fence = Fence(None)
    try:
        assert fence.hold("web@1", None, time.monotonic() + 0.05, 1, expired)
        assert fence.holds("web@1")
        time.sleep(0.2)  # the caller's thread is busy: the fence does not need it
        assert done.wait(5) and fired == [(False, "fence")]
        assert not fence.holds("web@1")
        # a renewal that comes back after the deadline puts nothing back
        assert not fence.hold("web@1", None, time.monotonic() - 0.001, 1, expired)
        assert not fence.holds("web@1")
        # dropping ends the deadline without a callback
        assert fence.hold("web@2", None, time.monotonic() + 0.05, 1, expired)
        assert fence.drop("web@2") is False and not fence.holds("web@2")
        time.sleep(0.1)
        assert len(fired) == 1
    finally:
        fence.close()
