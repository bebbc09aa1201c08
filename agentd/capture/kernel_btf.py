"""Field offsets of kernel structs, read from the running kernel's BTF (/sys/kernel/btf/vmlinux).

bcc compiles against the installed kernel headers, which on many hosts are not the running kernel's (a
backported kernel, a header package of another build): a struct's layout from the headers may be wrong, and
the verifier checks every direct load through a BTF pointer against the real layout. So the capture program
walks `current->cgroups->dfl_cgrp->kn->id` with offsets taken from BTF here, passed in as -D constants.

Only what that walk needs is parsed: struct and union members (name, type, bit offset), pointers, and the
modifiers and typedefs between them. The format is include/uapi/linux/btf.h.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F

# kinds (include/uapi/linux/btf.h) and the bytes that follow each kind's 12-byte common header
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_MODIFIERS = {_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG}


class BtfError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int  # size for INT/STRUCT/UNION/ENUM, referenced type id for PTR/TYPEDEF/modifiers
    members: tuple[tuple[str, int, int], ...]  # (name, type id, bit offset) for STRUCT/UNION


def _extra(kind: int, vlen: int) -> int:
    if kind in (_INT, _VAR, _DECL_TAG):
        return 4
    if kind == _ARRAY:
        return 12
    if kind in (_STRUCT, _UNION, _DATASEC, _ENUM64):
        return 12 * vlen
    if kind in (_ENUM, _FUNC_PROTO):
        return 8 * vlen
    return 0


class KernelBtf:
    """The struct and pointer types of one BTF file, by id and by struct name."""

    def __init__(self, path: Path = VMLINUX_BTF) -> None:
        data = path.read_bytes()
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data, 0
        )
        if magic != _MAGIC:
            raise BtfError(f"{path} is not BTF (magic {magic:#x})")
        types_at, strings_at = hdr_len + type_off, hdr_len + str_off
        strings = data[strings_at : strings_at + str_len]

        def name(off: int) -> str:
            return strings[off : strings.index(b"\0", off)].decode()

        self.types: list[_Type | None] = [None]  # id 0 is void
        self.structs: dict[str, int] = {}
        pos, end = types_at, types_at + type_len
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            members: tuple[tuple[str, int, int], ...] = ()
            if kind in (_STRUCT, _UNION):
                kflag = info >> 31
                ms = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 + 12 * i)
                    ms.append((name(m_name), m_type, m_off & 0xFFFFFF if kflag else m_off))
                members = tuple(ms)
            t = _Type(kind, name(name_off) if kind in (_STRUCT, _UNION) else "", size_or_type, members)
            if kind == _STRUCT and t.name and t.name not in self.structs:
                self.structs[t.name] = len(self.types)
            self.types.append(t)
            pos += 12 + _extra(kind, vlen)

    def _resolve(self, type_id: int) -> _Type | None:
        t = self.types[type_id]
        while t is not None and t.kind in _MODIFIERS:
            t = self.types[t.size_or_type]
        return t

    def member(self, struct_name: str, field: str) -> tuple[int, _Type | None]:
        """Byte offset of `field` in `struct struct_name`, and its type (modifiers stripped)."""
        sid = self.structs.get(struct_name)
        if sid is None:
            raise BtfError(f"no struct {struct_name} in the kernel's BTF")
        st = self.types[sid]
        assert st is not None
        for m_name, m_type, bit_off in st.members:
            if m_name == field:
                if bit_off % 8:
                    raise BtfError(f"{struct_name}.{field} is a bit field")
                return bit_off // 8, self._resolve(m_type)
        raise BtfError(f"struct {struct_name} has no field {field} in the kernel's BTF")

    def pointer_chain(self, chain: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
        """Offsets of a walk `a->f1`, then (in the struct f1 points to) `->f2`, ...: each field but the last
        must be a pointer to the next struct, the last a 64-bit integer."""
        offsets = []
        for i, (struct_name, field) in enumerate(chain):
            off, t = self.member(struct_name, field)
            if i + 1 < len(chain):
                target = self._resolve(t.size_or_type) if t is not None and t.kind == _PTR else None
                if target is None or target.kind != _STRUCT or target.name != chain[i + 1][0]:
                    raise BtfError(f"{struct_name}.{field} is not a pointer to struct {chain[i + 1][0]}")
            elif t is None or t.kind not in (_INT, _ENUM64) or t.size_or_type != 8:
                raise BtfError(f"{struct_name}.{field} is not a 64-bit integer")
            offsets.append(off)
        return tuple(offsets)


# current->cgroups->dfl_cgrp->kn->id: the cgroup v2 id, as bpf_get_current_cgroup_id() computes it
CGROUP_ID_WALK = (
    ("task_struct", "cgroups"),
    ("css_set", "dfl_cgrp"),
    ("cgroup", "kn"),
    ("kernfs_node", "id"),
)


def cgroup_id_walk_cflags(path: Path = VMLINUX_BTF) -> tuple[list[str], str]:
    """-D flags for the capture program's cgroup test: the walk's offsets from this kernel's BTF. Without them
    (no BTF, or a kernel whose structs do not match the walk) the program calls bpf_get_current_cgroup_id(),
    slower on every syscall: the second value says why, "" when the walk is used. Run in the build child:
    parsing BTF allocates tens of MB the daemon need not keep."""
    try:
        offsets = KernelBtf(path).pointer_chain(CGROUP_ID_WALK)
    except (OSError, BtfError) as e:
        return [], str(e)
    names = ("TASK_CGROUPS_OFF", "CSS_SET_DFL_CGRP_OFF", "CGROUP_KN_OFF", "KERNFS_NODE_ID_OFF")
    return ["-DCGROUP_ID_WALK", *(f"-D{n}={off}" for n, off in zip(names, offsets, strict=True))], ""
