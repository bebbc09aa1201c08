"""Keep only the capabilities the running agent needs, once the capture is loaded.

Debian's and Ubuntu's kernels carry a `kernel.perf_event_paranoid` level 3 (their default) under which
perf_event_open() needs CAP_SYS_ADMIN, whatever else the caller holds; attaching a tracepoint program goes
through perf_event_open(). So the unit starts the agent with CAP_SYS_ADMIN (and CAP_SETPCAP, to give it up),
and as soon as the capture is attached the agent drops both from every set, the bounding set included: the
daemon that then serves, and every hook or check it runs (NoNewPrivileges=yes), holds only the capabilities
named in $SHADOWPLANE_KEEP_CAPABILITIES. Without that variable (the agent run by hand) nothing is dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

KEEP_ENV = "SHADOWPLANE_KEEP_CAPABILITIES"

# linux/capability.h
CAP_NAMES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}  # fmt: skip
CAP_BY_NUMBER = {v: k for k, v in CAP_NAMES.items()}

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPGET = 125  # x86_64
_SYS_CAPSET = 126


class CapabilityError(RuntimeError):
    pass


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class Sets:
    effective: int
    permitted: int
    inheritable: int


def parse_keep(text: str) -> frozenset[int]:
    """'CAP_BPF CAP_NET_ADMIN' (spaces or commas) into capability numbers; an unknown name is an error."""
    out = set()
    for name in text.replace(",", " ").split():
        n = CAP_NAMES.get(name.upper())
        if n is None:
            raise CapabilityError(f"{KEEP_ENV}: unknown capability {name!r} (names as in capabilities(7))")
        out.add(n)
    return frozenset(out)


def names(caps: int | frozenset[int]) -> list[str]:
    numbers = caps if isinstance(caps, frozenset) else {n for n in range(64) if caps >> n & 1}
    return sorted(CAP_BY_NUMBER.get(n, str(n)) for n in numbers)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def read_sets() -> Sets:
    libc = _libc()
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.syscall(_SYS_CAPGET, ctypes.byref(header), data) != 0:
        raise CapabilityError(f"capget: {os.strerror(ctypes.get_errno())}")

    def both(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    return Sets(both("effective"), both("permitted"), both("inheritable"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def keep_only(keep: frozenset[int]) -> list[str]:
    """Drop every capability not in `keep` from this process's bounding, ambient, inheritable, permitted and
    effective sets, and return the names dropped from the permitted set. Capabilities are per thread, so this
    must run while the process has one thread: with more it refuses rather than leave some threads
    privileged."""
    n_threads = threads()
    if n_threads != 1:
        raise CapabilityError(
            f"cannot drop capabilities with {n_threads} threads running (they would keep them)"
        )
    libc = _libc()
    before = read_sets()
    keep_mask = sum(1 << n for n in keep)
    setpcap = CAP_NAMES["CAP_SETPCAP"]
    # The bounding set first, while CAP_SETPCAP (which that needs) is effective; CAP_SETPCAP itself last.
    order = [n for n in sorted(CAP_BY_NUMBER) if n != setpcap] + [setpcap]
    for n in order:
        if n in keep or libc.prctl(PR_CAPBSET_READ, n, 0, 0, 0) != 1:
            continue
        if libc.prctl(PR_CAPBSET_DROP, n, 0, 0, 0) != 0:
            why = os.strerror(ctypes.get_errno())
            raise CapabilityError(f"dropping {CAP_BY_NUMBER[n]} from the bounding set: {why}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    permitted = before.permitted & keep_mask
    effective = before.effective & keep_mask
    for i in (0, 1):
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = 0
    if libc.syscall(_SYS_CAPSET, ctypes.byref(header), data) != 0:
        raise CapabilityError(f"capset: {os.strerror(ctypes.get_errno())}")
    return names(before.permitted & ~keep_mask)
