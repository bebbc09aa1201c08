"""Service addresses (VIPs) on this host: add, refresh, remove, announce.

Every VIP the agent adds is marked with IFA_PROTO = 0x53 and carries a kernel lifetime the agent keeps
refreshing while it holds the lease. Two consequences:
- at start, and when systemd stops or restarts the agent (ExecStopPost), `remove_marked()` drops any VIP
  left behind but those a cleanly stopped agent recorded to resume (agentd/held_leases.py), which its
  next start keeps only if the observers still grant the lease;
- if the agent hangs, dies or stops without coming back, the kernel itself deletes the address when the
  lifetime runs out.
The lease guard in the running agent removes the address far sooner; these are the backstops.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

SHADOWPLANE_PROTO = 0x53  # IFA_PROTO value marking our addresses (kernel >= 5.18 keeps it)
IFA_F_NODAD = 0x02
ETH_P_ARP = 0x0806
T = TypeVar("T")


class AddressError(RuntimeError):
    pass


@dataclass(frozen=True)
class Vip:
    address: str
    prefixlen: int
    interface: str

    @classmethod
    def parse(cls, cidr: str, interface: str) -> Vip:
        try:
            iface = ipaddress.ip_interface(cidr)
        except ValueError:
            raise AddressError(f"vip {cidr!r} is not ADDRESS/PREFIX") from None
        return cls(str(iface.ip), iface.network.prefixlen, interface)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET


class Addresses:
    """Netlink access to this network namespace's addresses.

    pyroute2's synchronous IPRoute runs its own event loop, which must not be the agent's: every netlink
    call runs on one private thread (each takes well under a millisecond, so callers may wait for it).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self.ipr: IPRoute = self._pool.submit(IPRoute).result()

    def _run(self, fn: Callable[..., T], *args: object) -> T:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._run(self.ipr.close)
        self._pool.shutdown()

    def ifindex(self, interface: str) -> int:
        return self._run(self._index, interface)

    def _index(self, interface: str) -> int:
        found = self.ipr.link_lookup(ifname=interface)
        if not found:
            raise AddressError(
                f"no network interface {interface!r} on this host (check the workload's interface)"
            )
        return int(found[0])

    def has(self, vip: Vip) -> bool:
        return self._run(self._has, vip)

    def _has(self, vip: Vip) -> bool:
        idx = self._index(vip.interface)
        return any(
            a.get_attr("IFA_ADDRESS") == vip.address for a in self.ipr.get_addr(index=idx, family=vip.family)
        )

    def hold(
        self,
        vip: Vip,
        lifetime: int,
        deadline: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> bool:
        """Add the VIP, or refresh its lifetime if present, if `deadline` (on `clock`) has not passed. False
        if it had passed just before the kernel call, or had by the time the call returned: then the process
        was paused in between (SIGSTOP, a frozen VM, a long stall) while its lease may have moved to another
        host, and the address is removed again at once."""
        return self._run(self._hold, vip, lifetime, deadline, clock)

    def _hold(self, vip: Vip, lifetime: int, deadline: float, clock: Callable[[], float]) -> bool:
        idx = self._index(vip.interface)
        extra = {"IFA_FLAGS": IFA_F_NODAD} if vip.family == socket.AF_INET6 else {}
        # Checked here, on the thread that makes the kernel call and right before it, not only where the
        # caller decided: a pause between a check and the call (a thread hand-off under load takes
        # milliseconds) would add the address after the lease ran out. The kernel has no conditional add,
        # so a pause inside the call itself is caught just after it, below.
        if clock() >= deadline:
            return False
        try:
            self.ipr.addr(
                "replace",
                index=idx,
                address=vip.address,
                prefixlen=vip.prefixlen,
                IFA_CACHEINFO={"ifa_preferred": lifetime, "ifa_valid": lifetime},
                IFA_PROTO=SHADOWPLANE_PROTO,
                **extra,
            )
        except NetlinkError as e:
            raise AddressError(f"cannot add {vip.address}/{vip.prefixlen} on {vip.interface}: {e}") from None
        late = clock() - deadline
        if late >= 0:
            self._remove(vip)
            log.warning(
                "%s: paused %.3f s past the lease while adding it; removed it again",
                vip.address,
                late,
            )
            return False
        return True

    def remove(self, vip: Vip) -> bool:
        """Remove the VIP; False if it was not there."""
        return self._run(self._remove, vip)

    def _remove(self, vip: Vip) -> bool:
        try:
            idx = self._index(vip.interface)
            self.ipr.addr("del", index=idx, address=vip.address, prefixlen=vip.prefixlen)
        except NetlinkError as e:
            if e.code in (99, 19):  # EADDRNOTAVAIL, ENODEV: already gone
                return False
            raise AddressError(f"cannot remove {vip.address} from {vip.interface}: {e}") from None
        return True

    def marked(self) -> list[tuple[int, str, int]]:
        """(ifindex, address, prefixlen) of every address carrying our mark."""
        return self._run(self._marked)

    def _marked(self) -> list[tuple[int, str, int]]:
        out = []
        for a in self.ipr.get_addr():
            if a.get_attr("IFA_PROTO") == SHADOWPLANE_PROTO:
                out.append((int(a["index"]), str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"])))
        return out

    def remove_all_marked(self) -> list[str]:
        return self.remove_marked(keep=frozenset())

    def remove_marked(self, keep: Set[str]) -> list[str]:
        """Remove every marked address but those in `keep` (leases an agent resumed or means to resume)."""
        return self._run(self._remove_marked, keep)

    def _remove_marked(self, keep: Set[str]) -> list[str]:
        removed = []
        for idx, address, plen in self._marked():
            if address in keep:
                continue
            try:
                self.ipr.addr("del", index=idx, address=address, prefixlen=plen)
                removed.append(address)
            except NetlinkError:
                pass
        return removed

    def mac(self, interface: str) -> bytes:
        return self._run(self._mac, interface)

    def _mac(self, interface: str) -> bytes:
        link = self.ipr.get_links(self._index(interface))[0]
        return bytes.fromhex(str(link.get_attr("IFLA_ADDRESS")).replace(":", ""))


# ---- announcements ----


def garp_frames(ip: str, mac: bytes) -> list[bytes]:
    """A gratuitous ARP request and reply for `ip` at `mac`, broadcast (some stacks heed only one)."""
    ip_b = socket.inet_aton(ip)
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    frames = []
    for op, target_mac in ((1, b"\x00" * 6), (2, b"\xff" * 6)):
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + ip_b + target_mac + ip_b
        frames.append(eth + arp)
    return frames


def unsolicited_na(ip: str, mac: bytes) -> bytes:
    """ICMPv6 neighbour advertisement for `ip` with the Override flag and our link-layer address
    (the kernel fills in the checksum on raw ICMPv6 sockets)."""
    flags = 0x20000000  # Override; not Solicited, not Router
    body = struct.pack("!BBHI", 136, 0, 0, flags) + socket.inet_pton(socket.AF_INET6, ip)
    return body + struct.pack("!BB", 2, 1) + mac


def announce(vip: Vip, mac: bytes, ifindex: int, count: int, interval: float) -> int:
    """Send `count` announcements of `vip` (GARP for IPv4, unsolicited NA for IPv6); return how many went."""
    sent = 0
    if vip.family == socket.AF_INET:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((vip.interface, ETH_P_ARP))
            for i in range(count):
                for frame in garp_frames(vip.address, mac):
                    s.send(frame)
                sent += 1
                if i + 1 < count:
                    time.sleep(interval)
        return sent
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        packet = unsolicited_na(vip.address, mac)
        for i in range(count):
            s.sendto(packet, ("ff02::1", 0, 0, ifindex))
            sent += 1
            if i + 1 < count:
                time.sleep(interval)
    return sent
