"""The few bpf(2) commands the agent needs on maps and programs it holds as file descriptors.

The agent never imports bcc (whose LLVM costs ~150 MB of RSS): a short-lived child compiles and attaches
the programs and hands the descriptors over (see bpf_build). Reading and writing maps is then plain
syscalls on those descriptors.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SYS_BPF = 321  # x86_64
_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_MAP_DELETE_ELEM = 3
_MAP_GET_NEXT_KEY = 4
_OBJ_GET_INFO_BY_FD = 15
_RAW_TRACEPOINT_OPEN = 17
_LINK_GET_FD_BY_ID = 30
_LINK_GET_NEXT_ID = 31
_LINK_TYPE_RAW_TRACEPOINT = 1

_libc = ctypes.CDLL(None, use_errno=True)


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    ]


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info (include/uapi/linux/bpf.h) up to recursion_misses; the kernel fills the prefix
    # we ask for.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
    ]


class _NextIdAttr(ctypes.Structure):
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _RawTracepointLinkInfo(ctypes.Structure):
    # struct bpf_link_info's prefix for a raw tracepoint link
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("tp_name", ctypes.c_uint64),
        ("tp_name_len", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    return int(_libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@dataclass
class BpfMap:
    name: str
    fd: int
    key_size: int
    value_size: int
    percpu: bool = False

    @property
    def _value_buf_size(self) -> int:
        if self.percpu:
            return ((self.value_size + 7) // 8 * 8) * possible_cpus()
        return self.value_size

    def lookup(self, key: bytes) -> bytes | None:
        """The value (for per-CPU maps: every CPU's value, concatenated), or None if the key is absent."""
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(self._value_buf_size)
        attr = _MapElemAttr(self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
        if _bpf(_MAP_LOOKUP_ELEM, attr) != 0:
            return None
        return v.raw

    def update(self, key: bytes, value: bytes) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value, self._value_buf_size)
        attr = _MapElemAttr(self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
        if _bpf(_MAP_UPDATE_ELEM, attr) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf map {self.name}: update failed: {os.strerror(err)}")

    def delete(self, key: bytes) -> bool:
        k = ctypes.create_string_buffer(key, self.key_size)
        attr = _MapElemAttr(self.fd, 0, ctypes.addressof(k), 0, 0)
        return _bpf(_MAP_DELETE_ELEM, attr) == 0

    def keys(self) -> Iterator[bytes]:
        cur: ctypes.Array[ctypes.c_char] | None = None
        while True:
            nxt = ctypes.create_string_buffer(self.key_size)
            attr = _MapElemAttr(self.fd, 0, ctypes.addressof(cur) if cur is not None else 0, 0, 0)
            attr.value = ctypes.addressof(nxt)
            if _bpf(_MAP_GET_NEXT_KEY, attr) != 0:
                return
            yield nxt.raw
            cur = nxt

    def close(self) -> None:
        os.close(self.fd)


def program_id(prog_fd: int) -> int:
    info = _ProgInfo()
    attr = _InfoAttr(prog_fd, ctypes.sizeof(info), ctypes.addressof(info))
    if _bpf(_OBJ_GET_INFO_BY_FD, attr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"reading BPF program info: {os.strerror(err)}")
    return int(info.id)


def raw_tracepoint_links() -> list[tuple[str, int]]:
    """Every raw tracepoint attachment on the host, as (tracepoint, program id): what the kernel runs."""
    out: list[tuple[str, int]] = []
    start = 0
    while True:
        nxt = _NextIdAttr(start, 0, 0)
        if _bpf(_LINK_GET_NEXT_ID, nxt) != 0:
            return out
        start = nxt.next_id
        fd = _bpf(_LINK_GET_FD_BY_ID, _NextIdAttr(start, 0, 0))
        if fd < 0:
            continue  # gone meanwhile
        try:
            name = ctypes.create_string_buffer(128)
            info = _RawTracepointLinkInfo(tp_name=ctypes.addressof(name), tp_name_len=128)
            if _bpf(_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))) != 0:
                continue
            if info.type == _LINK_TYPE_RAW_TRACEPOINT:
                out.append((name.value.decode(), int(info.prog_id)))
        finally:
            os.close(fd)


def recursion_misses(prog_fd: int) -> int:
    """Times the kernel skipped this program because another BPF program was running on that CPU."""
    info = _ProgInfo()
    attr = _InfoAttr(prog_fd, ctypes.sizeof(info), ctypes.addressof(info))
    if _bpf(_OBJ_GET_INFO_BY_FD, attr) != 0:
        return 0
    return int(info.recursion_misses)


def raw_tracepoint_open(prog_fd: int, tracepoint: str) -> int:
    """Attach a loaded raw tracepoint program; closing the returned descriptor detaches it. Needs CAP_BPF
    (or CAP_SYS_ADMIN), which the agent keeps: the latency windows attach sys_exit this way."""
    name = ctypes.create_string_buffer(tracepoint.encode())
    attr = _RawTracepointAttr(ctypes.addressof(name), prog_fd, 0)
    fd = _bpf(_RAW_TRACEPOINT_OPEN, attr)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"attaching to raw tracepoint {tracepoint} failed: {os.strerror(err)}")
    return fd
