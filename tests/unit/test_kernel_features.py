"""What the capture captures on a kernel, decided from its tracepoint formats and BTF (never its version)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentd.capture.kernel_features import (
    FEATURES,
    TRACEFS,
    KernelView,
    compile_flags,
    decide,
    flag_names,
    format_fields,
)
from tests.support import need

ROOT = Path(__file__).resolve().parents[2]
# Debian 12's kernel 6.1: the format files of every tracepoint the table names that this kernel has
# (copied from a real Debian 12 guest; tests/capture/formats/linux-6.1/README.md).
LINUX_6_1 = ROOT / "tests/capture/formats/linux-6.1"


def kernel_6_1(tmp_path: Path, btf: bool = True) -> KernelView:
    vmlinux = tmp_path / "vmlinux"
    if btf:
        vmlinux.write_bytes(b"")  # only its existence is read; Debian 12 builds with CONFIG_DEBUG_INFO_BTF
    return KernelView(LINUX_6_1, vmlinux)


def by_name(kernel: KernelView) -> dict[str, tuple[bool, str, str]]:
    return {s.name: (s.captured, s.flag, s.detail) for s in decide(kernel)}


def test_debian_12_kernel_gets_the_fallbacks_and_says_what_it_lacks(tmp_path: Path) -> None:
    got = by_name(kernel_6_1(tmp_path))
    # tcp:tcp_probe has no skaddr on 6.1: RTT is matched by the connection's addresses and ports
    assert got["tcp_srtt"][:2] == (True, "HAVE_TCP_PROBE_TUPLE")
    assert "tcp:tcp_probe has no skaddr" in got["tcp_srtt"][2]
    # no sock:sock_{send,recv}_length (6.3+): accepted sockets are owned on their first receive
    assert got["tcp_accepted_sockets"][:2] == (True, "HAVE_TCP_RCV_SPACE_ADJUST")
    # no block:block_io_start (6.5+): the owner is taken where a request is queued
    assert got["block_io_submitter"][:2] == (True, "HAVE_BLOCK_RQ_INSERT")
    assert "block:block_io_start is missing" in got["block_io_submitter"][2]
    assert all(
        got[n][0] for n in ("syscalls", "block_io", "tcp_states", "tcp_retransmits", "tcp_socket_cleanup")
    )


def test_debian_12_kernel_compile_flags(tmp_path: Path) -> None:
    k = kernel_6_1(tmp_path)
    flags = compile_flags(k, decide(k), tmp_path / "headers")
    assert set(flags) == {
        "-DHAVE_SYSCALLS",
        "-DHAVE_BLOCK_RQ",
        "-DHAVE_BLOCK_RQ_INSERT",
        "-DHAVE_INET_SOCK_SET_STATE",
        "-DHAVE_TCP_RCV_SPACE_ADJUST",
        "-DHAVE_TCP_PROBE_TUPLE",
        "-DHAVE_TCP_RETRANSMIT",
        "-DHAVE_TCP_SEND_RESET",
        "-DHAVE_TCP_RECEIVE_RESET",
        "-DHAVE_TCP_DESTROY_SOCK",
    }  # no skaddr-keyed tcp_probe, no sock_*_length, no block_io_start, no sk_rst_reason enum


def test_without_btf_syscalls_are_not_captured_and_the_reason_names_it(tmp_path: Path) -> None:
    got = by_name(kernel_6_1(tmp_path, btf=False))
    captured, _, detail = got["syscalls"]
    assert not captured
    assert "system call counts and latency" in detail and "BTF" in detail
    assert got["block_io"][0]  # the rest does not need BTF


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    tree = tmp_path / "tracefs"
    for f in LINUX_6_1.rglob("format"):
        dest = tree / f.relative_to(LINUX_6_1)
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = f.read_text()
        if f.parent.name == "tcp_probe":
            text = re.sub(r".*\bsrtt;.*\n", "", text)  # a kernel whose tcp_probe has no srtt
        dest.write_text(text)
    got = by_name(KernelView(tree, LINUX_6_1 / "no-btf"))
    captured, _, detail = got["tcp_srtt"]
    assert not captured
    assert "tcp:tcp_probe has no field skaddr" in detail  # the preferred source
    assert "tcp:tcp_probe has no field srtt" in detail  # and the fallback


def test_a_feature_whose_base_is_missing_is_not_captured(tmp_path: Path) -> None:
    tree = tmp_path / "tracefs"
    for f in LINUX_6_1.rglob("format"):
        if f.parent.name != "inet_sock_set_state":
            dest = tree / f.relative_to(LINUX_6_1)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(f.read_text())
    got = by_name(KernelView(tree, tmp_path / "no-btf"))
    assert not got["tcp_states"][0]
    for name in ("tcp_srtt", "tcp_retransmits", "tcp_accepted_sockets"):
        assert not got[name][0] and "needs tcp_states" in got[name][2]


def test_format_fields_reads_array_pointer_and_dynamic_fields() -> None:
    text = (LINUX_6_1 / "events/tcp/tcp_probe/format").read_text()
    assert {"saddr", "daddr", "sport", "srtt", "sock_cookie"} <= format_fields(text)
    assert "skaddr" not in format_fields(text)
    text = (LINUX_6_1 / "events/block/block_rq_complete/format").read_text()
    assert {"dev", "sector", "nr_sector", "rwbs", "cmd"} <= format_fields(text)
    # some kernels print an array's size as the source spells it
    line = "\tfield:__u8 saddr[sizeof(struct sockaddr_in6)];\toffset:8;\tsize:28;\tsigned:0;\n"
    assert format_fields(line) == {"saddr"}


def test_every_flag_in_the_table_is_tested_by_the_program_and_back() -> None:
    program = (ROOT / "agentd/capture/bpf_program.c").read_text()
    used = set(re.findall(r"\b(HAVE_[A-Z0-9_]+)\b", program))
    assert used == flag_names(), (
        f"only in the C: {used - flag_names()}; only in the table: {flag_names() - used}"
    )


def test_the_running_kernels_formats_are_read_field_by_field() -> None:
    """On the real tracefs: the parser finds every field line of every format the table reads, and each
    decision names only tracepoints/fields that really are absent."""
    need((TRACEFS / "events").is_dir(), "no tracefs", f"mount tracefs at {TRACEFS}")
    kernel = KernelView()
    tracepoints = {p.tracepoint for f in FEATURES for s in f.sources for p in s.probes}
    seen = 0
    for tp in sorted(tracepoints):
        text = kernel.format_text(tp)
        if not text:
            continue
        seen += 1
        lines = [line for line in text.splitlines() if line.strip().startswith("field:")]
        assert len(format_fields(text)) == len(lines), f"{tp}: {lines}"
    assert seen >= 10, "most of the table's tracepoints exist on any kernel the agent supports"
    for s in decide(kernel):
        if s.captured:
            continue
        absent = re.findall(r"no tracepoint (\w+):(\w+)", s.detail)
        for system, event in absent:
            assert kernel.fields(f"{system}/{event}") is None


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_every_feature_says_what_is_lost_and_how_it_is_captured(feature: object) -> None:
    from agentd.capture.kernel_features import Feature

    assert isinstance(feature, Feature)
    assert feature.lost and all(s.how and s.probes for s in feature.sources)
    known = {f.name for f in FEATURES[: FEATURES.index(feature)]}
    assert set(feature.requires) <= known, "a feature requires only features decided before it"
