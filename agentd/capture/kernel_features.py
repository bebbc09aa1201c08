"""What this kernel lets the capture program see, decided from the kernel's own tracepoint formats and BTF.

One table (`FEATURES`) says, for each thing the capture reports, which tracepoints and which of their fields
the program reads to get it (in order of preference: the first source this kernel has wins), the compile flag
that switches that code on in bpf_program.c, and what is lost without it. The same decision makes the -D
flags and the report (`CaptureStatus.features`, the agent's /metrics and its start-up log), so what the agent
says it captures is what the program it loaded does. No kernel version is ever compared: distributions
backport tracepoints, and a field that exists is read whatever the version says.

The formats come from tracefs (`<root>/events/<system>/<event>/format`); tests pass a directory of real
format files of another kernel instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# `field:__u8 saddr[sizeof(struct sockaddr_in6)];	offset:8;	size:28;	signed:0;` -> saddr
_FIELD = re.compile(r"^\s*field:.*?\s\*?(\w+)\s*(?:\[[^\]]*\])?;\s*offset:", re.MULTILINE)


@dataclass(frozen=True)
class Probe:
    """One tracepoint the program attaches to ("system/event"), and the fields of its format it reads."""

    tracepoint: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    """One way to capture a feature: the code under `flag` in bpf_program.c, which reads these probes."""

    flag: str
    probes: tuple[Probe, ...]
    how: str  # what the report says when this source is used (how it is attributed, any limit)
    needs_btf: bool = False  # reads BPF task storage / bpf_get_current_task_btf(), which need vmlinux BTF


@dataclass(frozen=True)
class Feature:
    name: str
    sources: tuple[Source, ...]  # by preference
    lost: str  # what the capture does not report without it
    requires: tuple[str, ...] = ()  # features without which this one cannot work


@dataclass(frozen=True)
class FeatureStatus:
    """The decision for one feature on this kernel: the report's row."""

    name: str
    captured: bool
    detail: str  # captured: how; not captured: what is lost, and the tracepoint/field/BTF this kernel lacks
    flag: str = ""  # the source's compile flag when captured


_TCP_TUPLE = ("sport", "dport", "saddr_v6", "daddr_v6")

FEATURES: tuple[Feature, ...] = (
    Feature(
        "syscalls",
        (
            Source(
                "HAVE_SYSCALLS",
                (Probe("raw_syscalls/sys_enter", ("id",)), Probe("raw_syscalls/sys_exit", ("ret",))),
                "every system call counted by number; latency timed on a sample",
                needs_btf=True,
            ),
        ),
        "system call counts and latency",
    ),
    Feature(
        "block_io",
        (
            Source(
                "HAVE_BLOCK_RQ",
                (
                    Probe("block/block_rq_issue", ("dev", "sector")),
                    Probe("block/block_rq_complete", ("dev", "sector", "nr_sector", "rwbs")),
                ),
                "block requests, bytes and latency (issue to completion)",
            ),
        ),
        "block I/O operations, bytes and latency",
    ),
    Feature(
        "block_io_submitter",
        (
            Source(
                "HAVE_BLOCK_IO_START",
                (Probe("block/block_io_start", ("dev", "sector")),),
                "block requests attributed to the task that submitted them",
            ),
            Source(
                "HAVE_BLOCK_RQ_INSERT",
                (Probe("block/block_rq_insert", ("dev", "sector")),),
                "block requests attributed to the task that queued them (block:block_io_start is missing): "
                "the submitter, unless a request reaches the queue from a kernel worker",
            ),
        ),
        "block requests are attributed to the task that issues them to the device: buffered writes flushed "
        "by a kernel writeback worker, or requests a scheduler held back, count for no workload",
        requires=("block_io",),
    ),
    Feature(
        "tcp_states",
        (
            Source(
                "HAVE_INET_SOCK_SET_STATE",
                (Probe("sock/inet_sock_set_state", ("skaddr", "newstate", "protocol")),),
                "TCP state changes of the workload's sockets (connect, listen, close, ...)",
            ),
        ),
        "TCP state changes and connects; no TCP event can be attributed without it",
    ),
    Feature(
        "tcp_accepted_sockets",
        (
            Source(
                "HAVE_SOCK_LENGTH",
                (
                    Probe("sock/sock_send_length", ("sk", "protocol")),
                    Probe("sock/sock_recv_length", ("sk", "protocol")),
                ),
                "accepted connections attributed on their first send or receive",
            ),
            Source(
                "HAVE_TCP_RCV_SPACE_ADJUST",
                (Probe("tcp/tcp_rcv_space_adjust", ("skaddr",)),),
                "accepted connections attributed on their first receive (sock:sock_recv_length is missing); "
                "one that only ever sends is not",
            ),
        ),
        "accepted (server-side) connections are not attributed: TCP figures cover the connections the "
        "workload opened or listens with",
        requires=("tcp_states",),
    ),
    Feature(
        "tcp_srtt",
        (
            Source(
                "HAVE_TCP_PROBE_SK",
                (Probe("tcp/tcp_probe", ("skaddr", "srtt")),),
                "smoothed RTT samples by socket",
            ),
            Source(
                "HAVE_TCP_PROBE_TUPLE",
                (
                    Probe("tcp/tcp_probe", ("family", "saddr", "daddr", "sport", "dport", "srtt")),
                    Probe("sock/inet_sock_set_state", _TCP_TUPLE),
                    Probe("tcp/tcp_rcv_space_adjust", ("skaddr", *_TCP_TUPLE)),
                ),
                "smoothed RTT samples matched to a socket by its addresses and ports (tcp:tcp_probe has no "
                "skaddr on this kernel): a connection counts once established (connect) or once it "
                "received (accept); identical address/port pairs in two network namespaces are not "
                "told apart",
            ),
        ),
        "TCP smoothed round-trip times",
        requires=("tcp_states",),
    ),
    Feature(
        "tcp_retransmits",
        (
            Source(
                "HAVE_TCP_RETRANSMIT",
                (Probe("tcp/tcp_retransmit_skb", ("skaddr",)),),
                "retransmitted segments",
            ),
        ),
        "TCP retransmits",
        requires=("tcp_states",),
    ),
    Feature(
        "tcp_resets_sent",
        (Source("HAVE_TCP_SEND_RESET", (Probe("tcp/tcp_send_reset", ("skaddr",)),), "resets sent"),),
        "TCP resets sent",
        requires=("tcp_states",),
    ),
    Feature(
        "tcp_resets_received",
        (
            Source(
                "HAVE_TCP_RECEIVE_RESET", (Probe("tcp/tcp_receive_reset", ("skaddr",)),), "resets received"
            ),
        ),
        "TCP resets received",
        requires=("tcp_states",),
    ),
    Feature(
        "tcp_socket_cleanup",
        (
            Source(
                "HAVE_TCP_DESTROY_SOCK",
                (Probe("tcp/tcp_destroy_sock", ("skaddr",)),),
                "a socket is forgotten when the kernel destroys it",
            ),
        ),
        "a socket is forgotten only on its change to TCP_CLOSE",
        requires=("tcp_states",),
    ),
)


def format_fields(format_text: str) -> frozenset[str]:
    """The field names a tracepoint's format file declares (common_* included)."""
    return frozenset(_FIELD.findall(format_text))


class KernelView:
    """The tracepoint formats and BTF of one kernel: the running one, or a directory of saved formats."""

    def __init__(self, tracefs: Path = TRACEFS, btf: Path = VMLINUX_BTF) -> None:
        self.tracefs, self.btf = tracefs, btf
        self._fields: dict[str, frozenset[str] | None] = {}

    def fields(self, tracepoint: str) -> frozenset[str] | None:
        """The fields of "system/event", or None when this kernel has no such tracepoint."""
        if tracepoint not in self._fields:
            try:
                text = (self.tracefs / "events" / tracepoint / "format").read_text()
            except OSError:
                self._fields[tracepoint] = None
            else:
                self._fields[tracepoint] = format_fields(text)
        return self._fields[tracepoint]

    def format_text(self, tracepoint: str) -> str:
        try:
            return (self.tracefs / "events" / tracepoint / "format").read_text()
        except OSError:
            return ""

    def has_btf(self) -> bool:
        return self.btf.exists()

    def lacks(self, source: Source) -> str:
        """What of `source` this kernel lacks ("" when it has everything)."""
        for p in source.probes:
            have = self.fields(p.tracepoint)
            if have is None:
                return f"no tracepoint {p.tracepoint.replace('/', ':')}"
            missing = [f for f in p.fields if f not in have]
            if missing:
                return f"{p.tracepoint.replace('/', ':')} has no field {', '.join(missing)}"
        if source.needs_btf and not self.has_btf():
            return f"no kernel BTF at {self.btf} (a kernel built without CONFIG_DEBUG_INFO_BTF)"
        return ""


def decide(kernel: KernelView) -> tuple[FeatureStatus, ...]:
    """Each feature of `FEATURES`, captured or not on this kernel, and why."""
    out: dict[str, FeatureStatus] = {}
    for f in FEATURES:
        missing_req = [r for r in f.requires if not out[r].captured]
        if missing_req:
            out[f.name] = FeatureStatus(f.name, False, f"{f.lost} (needs {', '.join(missing_req)})")
            continue
        reasons = []
        for s in f.sources:
            lack = kernel.lacks(s)
            if not lack:
                out[f.name] = FeatureStatus(f.name, True, s.how, s.flag)
                break
            reasons.append(lack)
        else:
            out[f.name] = FeatureStatus(f.name, False, f"{f.lost} ({'; '.join(reasons)})")
    return tuple(out.values())


def compile_flags(kernel: KernelView, features: tuple[FeatureStatus, ...], headers: Path) -> list[str]:
    """The -D flags for bpf_program.c: one per captured feature's source, and header fix-ups.

    `headers` is the kernel's header tree bcc compiles against (/lib/modules/<release>/source)."""
    flags = [f"-D{s.flag}" for s in features if s.captured]
    # tcp:tcp_send_reset carries `enum sk_rst_reason` on newer kernels; bcc's generated struct names the enum,
    # so it must be declared when the installed headers do not.
    if (
        "enum sk_rst_reason" in kernel.format_text("tcp/tcp_send_reset")
        and not (headers / "include/net/rst_reason.h").exists()
    ):
        flags.append("-DDECLARE_SK_RST_REASON")
    return flags


def flag_names() -> frozenset[str]:
    """Every compile flag the table can set (bpf_program.c must test each)."""
    return frozenset(s.flag for f in FEATURES for s in f.sources)
