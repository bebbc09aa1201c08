"""Cumulative kernel-side counters of one workload, and the pure arithmetic on them.

The BPF maps hold cumulative counts per slot; user space keeps the previous reading and ships the
difference, so nothing is lost between a read and a reset (there is no reset). Array lengths are the C
structs' (bpf_program.c, read through agentd/capture/map_layout.py); empty lists stand for "no capture".
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Linux TCP states by number (include/net/tcp_states.h).
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}


def _diff(now: list[int], before: list[int]) -> list[int]:
    return [max(0, a - b) for a, b in zip(now, before, strict=True)]


@dataclass
class SyscallCounters:
    by_nr: list[int] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)
    timed_ns: int = 0  # time during which latency was timed (timing windows open): the histogram's window

    def minus(self, before: SyscallCounters) -> SyscallCounters:
        return SyscallCounters(
            _diff(self.by_nr, before.by_nr),
            _diff(self.latency_ns, before.latency_ns),
            max(0, self.timed_ns - before.timed_ns),
        )


@dataclass
class BlockCounters:
    read_ops: int = 0
    write_ops: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    discard_ops: int = 0
    discard_bytes: int = 0
    latency_us: list[int] = field(default_factory=list)

    def minus(self, before: BlockCounters) -> BlockCounters:
        return BlockCounters(
            max(0, self.read_ops - before.read_ops),
            max(0, self.write_ops - before.write_ops),
            max(0, self.read_bytes - before.read_bytes),
            max(0, self.write_bytes - before.write_bytes),
            max(0, self.discard_ops - before.discard_ops),
            max(0, self.discard_bytes - before.discard_bytes),
            _diff(self.latency_us, before.latency_us),
        )


@dataclass
class TcpCounters:
    state: list[int] = field(default_factory=list)
    srtt_us: list[int] = field(default_factory=list)
    retransmits: int = 0
    resets_sent: int = 0
    resets_received: int = 0

    def minus(self, before: TcpCounters) -> TcpCounters:
        return TcpCounters(
            _diff(self.state, before.state),
            _diff(self.srtt_us, before.srtt_us),
            max(0, self.retransmits - before.retransmits),
            max(0, self.resets_sent - before.resets_sent),
            max(0, self.resets_received - before.resets_received),
        )


@dataclass
class KernelCounters:
    """Everything the BPF programs count for one workload."""

    syscalls: SyscallCounters = field(default_factory=SyscallCounters)
    block: BlockCounters = field(default_factory=BlockCounters)
    tcp: TcpCounters = field(default_factory=TcpCounters)

    def minus(self, before: KernelCounters) -> KernelCounters:
        return KernelCounters(
            self.syscalls.minus(before.syscalls), self.block.minus(before.block), self.tcp.minus(before.tcp)
        )
