"""VIP add/remove and announcements on real interfaces, in two namespaces this test creates.

B has a neighbour entry for the VIP pointing at a wrong MAC; after A adds the VIP and announces it
(gratuitous ARP / unsolicited NA with Override), B's entry must point at A.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.support import need_root, wait_until

SNIPPET = r"""
import json, sys
from agentd.actuate.address import Addresses, Vip, announce
op, cidr = sys.argv[1], sys.argv[2]
a = Addresses()
try:
    vip = Vip.parse(cidr, "eth0")
    if op == "hold":
        a.hold(vip, 30)
        sent = announce(vip, a.mac("eth0"), a.ifindex("eth0"), 3, 0.01)
        print(json.dumps({"sent": sent, "has": a.has(vip), "marked": [m[1] for m in a.marked()]}))
    elif op in ("paused", "late"):
        # A clock that says where the deadline is at each look: a "paused" owner passes the check before
        # the kernel call and is past its deadline when the call returns (a SIGSTOP in between); a "late"
        # one is past it before the call.
        looks = iter([5.0, 15.0] if op == "paused" else [15.0])
        held = a.hold(vip, 30, deadline=10.0, clock=lambda: next(looks))
        print(json.dumps({"held": held, "has": a.has(vip), "marked": [m[1] for m in a.marked()]}))
    elif op == "release-all":
        print(json.dumps({"removed": a.remove_all_marked(), "has": a.has(vip)}))
finally:
    a.close()
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    need_root()
    tag = uuid.uuid4().hex[:6]
    a, b = f"sptest-a-{tag}", f"sptest-b-{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, last in ((a, 1), (b, 2)):
            # eth0 exists already, so its own setting counts (a tentative link-local cannot send the NA)
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.88.0.{last}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"fd88::{last}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for ns in (a, b):
            # Until the kernel's link watcher marks the carrier up, the interface drops what it sends.
            wait_until(
                lambda ns=ns: (
                    json.loads(sh("ip", "-j", "-n", ns, "link", "show", "eth0"))[0]["operstate"] == "UP"
                ),
                5,
                f"{ns} eth0 up",
            )
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str, *args: str) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SNIPPET, *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def mac_of(ns: str) -> str:
    return json.loads(sh("ip", "-j", "-n", ns, "link", "show", "eth0"))[0]["address"]  # type: ignore[no-any-return]


def neigh(ns: str, ip: str) -> str | None:
    for n in json.loads(sh("ip", "-j", "-n", ns, "neigh", "show", "dev", "eth0")):
        if n.get("dst") == ip:
            return n.get("lladdr")  # type: ignore[no-any-return]
    return None


@pytest.mark.parametrize("vip", ["10.88.0.100/24", "fd88::100/64"])
def test_hold_announces_and_moves_the_neighbour_entry(pair: tuple[str, str], vip: str) -> None:
    a, b = pair
    ip = vip.split("/")[0]
    sh("ip", "-n", b, "neigh", "replace", ip, "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "stale")
    assert neigh(b, ip) == "02:00:00:00:00:99"
    r = in_ns(a, "hold", vip)
    assert r["sent"] == 3 and r["has"] is True and ip in r["marked"]  # type: ignore[operator]
    assert neigh(b, ip) == mac_of(a), "B's neighbour entry follows the announcement"
    # and B really reaches A on the VIP: A answers a connection to a closed port with a reset
    probe = (
        "import socket\ntry:\n"
        f" socket.create_connection(({ip!r}, 9), timeout=1)\n"
        "except ConnectionRefusedError:\n print('refused')"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", b, sys.executable, "-c", probe], capture_output=True, text=True
    )
    assert out.stdout.strip() == "refused"
    r = in_ns(a, "release-all", vip)
    assert r["removed"] == [ip] and r["has"] is False


def test_kernel_lifetime_is_set_on_held_addresses(pair: tuple[str, str]) -> None:
    a, _ = pair
    in_ns(a, "hold", "10.88.0.101/24")
    info = json.loads(sh("ip", "-j", "-n", a, "addr", "show", "dev", "eth0"))[0]["addr_info"]
    held = next(x for x in info if x["local"] == "10.88.0.101")
    assert 0 < held["valid_life_time"] <= 30  # the kernel drops it by itself if the agent stops refreshing


@pytest.mark.parametrize("op", ["paused", "late"])
def test_an_owner_paused_on_its_way_to_the_kernel_does_not_keep_the_address(
    pair: tuple[str, str], op: str
) -> None:
    """The lease ran out while the owner was on its way to add or refresh its address: it must not hold it
    afterwards (its successor may), whether the deadline had passed before the kernel call or during it."""
    a, _ = pair
    r = in_ns(a, op, "10.88.0.102/24")
    assert r == {"held": False, "has": False, "marked": []}, r
