"""An owner's lease against three real observer gRPC servers on loopback (no address: lease logic only)."""

from __future__ import annotations

import asyncio
import time

from agentd.actuate.fence import Fence
from agentd.failover import Channels, LeaseHolder, ObserverRole
from shadowplane.tls import TlsConfig
from shadowplane.v1 import agent_pb2 as apb
from tests.lease_observers import serve_observers

LEASE_MS = 300


def holder(
    addrs: list[str], events: list[apb.AgentMessage], token: int = 1, names: list[str] | None = None
) -> LeaseHolder:
    acq = apb.Acquire(
        service="web",
        token=token,
        observers=addrs,
        observer_names=names if names is not None else [f"o{i}" for i in range(len(addrs))],
        lease_ms=LEASE_MS,
        renew_interval_ms=50,
        drift_margin=0.05,
    )
    channels = Channels(TlsConfig(plaintext=True), "")
    return LeaseHolder("p1", acq, None, channels, events.append, Fence(None))


def test_lease_kept_while_a_majority_renews_and_lost_without() -> None:
    async def scenario() -> tuple[bool, bool, float]:
        _roles, servers, addrs = await serve_observers(3, LEASE_MS)
        events: list[apb.AgentMessage] = []
        h = holder(addrs, events)
        await h.start()
        await servers[2].stop(0)  # one observer gone: a majority remains
        await asyncio.sleep(1.0)
        kept = not h.lost
        t0 = time.monotonic()
        await servers[1].stop(0)  # now only one of three
        while not h.lost and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.005)
        lost_after = time.monotonic() - t0
        await servers[0].stop(0)
        await h.channels.close()
        return kept, h.lost, lost_after

    kept, lost, lost_after = asyncio.run(scenario())
    assert kept, "two of three observers are a majority"
    assert lost
    # it gives the lease up no later than one lease after its last good round started
    assert lost_after <= LEASE_MS / 1000 + 0.03, lost_after


def test_vote_for_a_newer_token_takes_the_lease_away_at_once() -> None:
    async def scenario() -> tuple[bool, list[str]]:
        roles, servers, addrs = await serve_observers(3, LEASE_MS)
        events: list[apb.AgentMessage] = []
        h = holder(addrs, events)
        await h.start()
        for r in roles[:2]:
            assert r.vote(apb.Vote(service="web", token=2, candidate="s1")).granted
        await asyncio.sleep(0.15)
        for s in servers:
            await s.stop(0)
        await h.channels.close()
        return h.lost, [m.lease_event.what + ":" + m.lease_event.reason for m in events]

    lost, evs = asyncio.run(scenario())
    assert lost
    assert evs[0].startswith("acquired") and "superseded" in evs[-1]


def test_acquire_fails_without_a_majority() -> None:
    async def scenario() -> str:
        _roles, servers, addrs = await serve_observers(1, LEASE_MS)
        h = holder([addrs[0], "127.0.0.1:1", "127.0.0.1:2"], [])
        try:
            await h.start()
        except Exception as e:
            return str(e)
        finally:
            await servers[0].stop(0)
            await h.channels.close()
        return "acquired"

    msg = asyncio.run(scenario())
    assert "no majority of 3 observers renewed" in msg


def test_an_observer_agent_reports_its_address_wait_with_its_vote() -> None:
    """The coordinator waits out a silent owner's address with what the voters report; an agent that did not
    say would make it fall back to a longer, older rule."""
    role = ObserverRole("o0", report=lambda m: None)
    role.leases.started_at -= 10
    role.leases.observe(["web"], LEASE_MS / 1000)
    assert role.vote(apb.Vote(service="web", token=1, candidate="p1")).granted
    assert role.leases.renew("web", 1, "p1").granted
    reply = role.vote(apb.Vote(service="web", token=2, candidate="s1"))
    assert reply.granted and reply.HasField("address_wait_ms")
    assert reply.address_wait_ms > reply.wait_ms > 0
