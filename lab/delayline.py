"""A userspace delay line on NFQUEUE: every packet the queue receives is held `--delay` seconds, then
accepted. It stands in for `tc qdisc ... netem delay`, which this machine's kernel lacks
(`CONFIG_NET_SCH_NETEM is not set`; nftables' `queue` is missing too, iptables' NFQUEUE target is there).

    ip netns exec splab-p1 python -m lab.delayline --queue 7 --delay 0.1

binds queue 7 in the namespace it runs in; `lab.faults.delay` adds the iptables rule that sends the host's
outgoing packets to it (`-j NFQUEUE --queue-bypass`: if this process dies, packets pass undelayed rather
than being dropped). The nfnetlink_queue protocol is spoken by hand (linux/netfilter/nfnetlink_queue.h):
bind, metadata-only copies, one ACCEPT verdict per packet when its time has come. Packets keep their order
(one constant delay: a FIFO).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")  # family, version, queue number (big endian)
_NLATTR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class Queue:
    def __init__(self, number: int, maxlen: int = 4096) -> None:
        self.number = number
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC)))
        self._config(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
        )

    def _send(self, msg: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> None:
        self.seq += 1
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, self.number) + attrs
        kind = (NFNL_SUBSYS_QUEUE << 8) | msg
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self.seq, 0) + body)

    def _config(self, attrs: bytes) -> None:
        self._send(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK)
        buf = self.sock.recv(65536)
        _length, kind, _, _, _ = _NLMSGHDR.unpack_from(buf)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", buf, _NLMSGHDR.size)
            if err:
                raise OSError(-err, f"NFQUEUE {self.number}: configuration refused")

    def packet_ids(self) -> list[int]:
        """Ids of the packets in one read from the socket."""
        buf = self.sock.recv(1 << 20)
        ids = []
        off = 0
        while off + _NLMSGHDR.size <= len(buf):
            length, kind, _, _, _ = _NLMSGHDR.unpack_from(buf, off)
            if length < _NLMSGHDR.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = off + _NLMSGHDR.size + _NFGENMSG.size
                while a + _NLATTR.size <= off + length:
                    alen, atype = _NLATTR.unpack_from(buf, a)
                    if alen < _NLATTR.size:
                        break
                    if atype & 0x3FFF == NFQA_PACKET_HDR:
                        ids.append(struct.unpack_from("!I", buf, a + _NLATTR.size)[0])
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3
        return ids

    def accept(self, packet_id: int) -> None:
        self._send(NFQNL_MSG_VERDICT, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)))


def run(number: int, delay: float) -> int:
    q = Queue(number)
    held: collections.deque[tuple[float, int]] = collections.deque()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    passed = 0
    print(f"delay line on NFQUEUE {number}: {delay * 1000:.0f} ms", flush=True)
    while not stopping:
        now = time.monotonic()
        while held and held[0][0] <= now:
            q.accept(held.popleft()[1])
            passed += 1
        wait = held[0][0] - now if held else 0.5
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([q.sock], [], [], max(0.0, wait))
            if ready:
                due = time.monotonic() + delay
                held.extend((due, i) for i in q.packet_ids())
    for _, i in held:  # let what is held go at once rather than lose it
        q.accept(i)
    print(f"delay line stopped: {passed + len(held)} packets delayed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.delayline", description=__doc__.split("\n")[0])
    p.add_argument("--queue", type=int, required=True, help="NFQUEUE number to bind")
    p.add_argument("--delay", type=float, required=True, help="seconds each packet is held")
    args = p.parse_args(argv)
    return run(args.queue, args.delay)


if __name__ == "__main__":
    sys.exit(main())
