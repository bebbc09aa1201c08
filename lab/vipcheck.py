"""Split-brain checker: which lab hosts hold each VIP, sampled every 10 ms.

One rtnetlink socket per namespace stays open and each sample is one address dump per host (parsed by hand:
a dump costs tens of microseconds, so sampling every host 100 times a second leaves the machine to the
system under test). A sample where two hosts hold the same VIP is a split brain, reported with its time
(CLOCK_MONOTONIC, like the poller's records).

A sample reads the hosts one after another, within about a millisecond; a VIP moved within that window can
show up in no host or (if the new owner is read after the move and the old one before it) in two. Owners
that let a lease expire before the next one takes over are apart by far more than that.

    python -m lab.vipcheck --host p1=splab-p1 --host s1=splab-s1 --vip 10.77.0.101 [--seconds N]

runs from the root namespace (it opens a socket in each lab namespace) and prints JSON at SIGTERM.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from lab.procs import run_until_stopped

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def parse_addresses(buf: bytes) -> tuple[set[str], bool]:
    """Addresses in an RTM_NEWADDR dump chunk, and whether the dump is complete. Pure."""
    found: set[str] = set()
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", buf, off + _NLMSGHDR.size)
            raise OSError(-err, "netlink address dump failed")
        if kind == RTM_NEWADDR:
            family = buf[off + _NLMSGHDR.size]
            a = off + _NLMSGHDR.size + _IFADDRMSG.size
            local = address = None
            while a + _RTATTR.size <= off + length:
                alen, atype = _RTATTR.unpack_from(buf, a)
                if alen < _RTATTR.size:
                    break
                if atype in (IFA_ADDRESS, IFA_LOCAL):
                    raw = buf[a + _RTATTR.size : a + alen]
                    text = socket.inet_ntop(
                        socket.AF_INET if family == socket.AF_INET else socket.AF_INET6, raw
                    )
                    if atype == IFA_LOCAL:
                        local = text
                    else:
                        address = text
                a += (alen + 3) & ~3
            # IPv4 puts the host's own address in IFA_LOCAL (IFA_ADDRESS is the peer on point-to-point)
            if local or address:
                found.add(local or address or "")
        off += (length + 3) & ~3
    return found, False


class AddressReader:
    """An rtnetlink socket inside one namespace, kept open; `read()` dumps its addresses."""

    def __init__(self, netns: str | None) -> None:
        from lab.topology import socket_in

        self.sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.settimeout(1.0)
        self.seq = 0

    def read(self) -> set[str]:
        self.seq += 1
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0)
        self.sock.send(hdr + body)
        found: set[str] = set()
        while True:
            chunk, done = parse_addresses(self.sock.recv(65536))
            found |= chunk
            if done:
                return found

    def close(self) -> None:
        self.sock.close()


def normalize(ip: str) -> str:
    return str(ipaddress.ip_address(ip.split("/")[0]))


def holders(addresses: Mapping[str, set[str]], vip: str) -> list[str]:
    """Hosts whose address set holds `vip`, sorted. Pure."""
    return sorted(h for h, addrs in addresses.items() if vip in addrs)


@dataclass(frozen=True)
class SplitBrain:
    t: float
    vip: str
    holders: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    t: float
    vip: str
    holders: tuple[str, ...]


@dataclass
class Report:
    samples: int = 0
    split_brains: list[SplitBrain] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)  # every change of a VIP's holders
    max_gap: float = 0.0  # longest time between two samples (shows whether 10 ms was kept)
    errors: list[str] = field(default_factory=list)


class VipChecker:
    """Samples every `interval` in a background thread; `start()`, then `stop()` returns the `Report`."""

    def __init__(self, namespaces: Mapping[str, str], vips: Sequence[str], interval: float = 0.01) -> None:
        self.namespaces = dict(namespaces)  # host name -> namespace
        self.vips = [normalize(v) for v in vips]
        self.interval = interval
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._readers: dict[str, AddressReader] = {}
        self._last: dict[str, tuple[str, ...]] = {}

    def start(self) -> VipChecker:
        try:
            for host, ns in self.namespaces.items():
                self._readers[host] = AddressReader(ns)
        except BaseException:
            self._close()
            raise
        self.sample()  # one synchronous sample: callers see the holders as of start
        self._thread = threading.Thread(target=self._run, name="vipcheck", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Report:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._close()
        return self.snapshot()

    def _close(self) -> None:
        # an open socket keeps its namespace alive after `ip netns del`: always close them
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def snapshot(self) -> Report:
        with self._lock:
            r = self.report
            return Report(r.samples, list(r.split_brains), list(r.changes), r.max_gap, list(r.errors))

    def current(self, vip: str) -> tuple[str, ...]:
        with self._lock:
            return self._last.get(normalize(vip), ())

    def sample(self) -> None:
        seen: dict[str, set[str]] = {}
        for host, reader in self._readers.items():
            try:
                seen[host] = reader.read()
            except OSError as e:
                with self._lock:
                    if len(self.report.errors) < 100:
                        self.report.errors.append(f"{time.monotonic():.3f} {host}: {e}")
                seen[host] = set()
        t = time.monotonic()
        with self._lock:
            self.report.samples += 1
            for vip in self.vips:
                hs = tuple(holders(seen, vip))
                if len(hs) > 1:
                    self.report.split_brains.append(SplitBrain(t, vip, hs))
                if self._last.get(vip) != hs:
                    self._last[vip] = hs
                    self.report.changes.append(Change(t, vip, hs))

    def _run(self) -> None:
        next_at = time.monotonic()
        last = next_at
        while not self._stop.is_set():
            self.sample()
            now = time.monotonic()
            with self._lock:
                self.report.max_gap = max(self.report.max_gap, now - last)
            last = now
            next_at += self.interval
            if next_at < now:  # fell behind: sample again at once, do not try to catch up
                next_at = now
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def read_all(namespaces: Mapping[str, str]) -> dict[str, set[str]]:
    """One dump of every namespace's addresses (sockets opened and closed here)."""
    out: dict[str, set[str]] = {}
    for host, ns in namespaces.items():
        try:
            r = AddressReader(ns)
        except OSError:
            continue
        try:
            out[host] = r.read()
        except OSError:
            out[host] = set()
        finally:
            r.close()
    return out


def report_json(r: Report) -> dict[str, object]:
    return {
        "samples": r.samples,
        "split_brain_samples": len(r.split_brains),
        "split_brains": [asdict(s) for s in r.split_brains],
        "changes": [asdict(c) for c in r.changes],
        "max_gap_seconds": round(r.max_gap, 4),
        "errors": r.errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.vipcheck", description=__doc__.split("\n")[0])
    p.add_argument("--host", action="append", required=True, help="NAME=NAMESPACE, once per host")
    p.add_argument("--vip", action="append", required=True, help="a VIP to watch (repeatable)")
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: at SIGTERM)")
    args = p.parse_args(argv)
    namespaces = dict(h.split("=", 1) for h in args.host)
    checker = VipChecker(namespaces, args.vip, args.interval).start()
    run_until_stopped(args.seconds)
    print(json.dumps(report_json(checker.stop()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
