"""The layout of a BPF map's values, as the C program defines it, and decoding values by field name.

bpf_program.c is the one definition of every map's value struct. The build child reads each struct's
layout from bcc's ctypes view of it (names, offsets, element sizes, array lengths) and ships it in its
manifest; the agent decodes values with that layout, never with offsets written down a second time. A field
the agent reads that the program does not define is a load error naming both, not a silent misread.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]


class LayoutError(RuntimeError):
    pass


@dataclass(frozen=True)
class Field:
    name: str  # "" for a map whose value is one number
    offset: int  # bytes from the start of the value
    size: int  # bytes per element (1, 2, 4 or 8)
    count: int  # elements: 1 for a scalar, the array length otherwise


@dataclass(frozen=True)
class MapLayout:
    name: str
    key_size: int
    value_size: int
    percpu: bool
    fields: tuple[Field, ...]

    @property
    def stride(self) -> int:
        """Bytes per value in a lookup's buffer: per-CPU maps hand back one 8-byte-aligned value per CPU."""
        return (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.fields) or "(none)"
        raise LayoutError(f"map {self.name} has no field {name!r} (bpf_program.c defines: {known})")

    def require(self, names: Iterable[str]) -> None:
        """Fail now if the program does not define a field the agent reads."""
        for n in names:
            self.field(n)

    def totals(self, raw: bytes, ncpu: int) -> dict[str, U64]:
        """Each unsigned field of a lookup's value, summed over CPUs for a per-CPU map, by name."""
        copies = ncpu if self.percpu else 1
        if len(raw) < copies * self.stride:
            raise LayoutError(f"map {self.name}: value of {len(raw)} bytes, expected {copies * self.stride}")
        rows = np.frombuffer(raw, dtype=np.uint8, count=copies * self.stride).reshape(copies, self.stride)
        out: dict[str, U64] = {}
        for f in self.fields:
            dt = np.dtype(f"<u{f.size}")
            block = np.ascontiguousarray(rows[:, f.offset : f.offset + f.size * f.count])
            out[f.name] = block.view(dt).astype(np.uint64).sum(axis=0, dtype=np.uint64)
        return out

    def encode(self, values: Mapping[str, int]) -> bytes:
        """One (not per-CPU) value with the named scalar fields set, the rest zero: what user space writes."""
        if self.percpu:
            raise LayoutError(f"map {self.name} is per-CPU: the agent does not write its values")
        buf = bytearray(self.value_size)
        for name, v in values.items():
            f = self.field(name)
            if f.count != 1:
                raise LayoutError(f"map {self.name}: field {name} is an array")
            buf[f.offset : f.offset + f.size] = int(v).to_bytes(f.size, "little")
        return bytes(buf)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key_size": self.key_size,
            "value_size": self.value_size,
            "percpu": self.percpu,
            "fields": [[f.name, f.offset, f.size, f.count] for f in self.fields],
        }

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any]) -> MapLayout:
        return cls(
            name=str(d["name"]),
            key_size=int(d["key_size"]),
            value_size=int(d["value_size"]),
            percpu=bool(d["percpu"]),
            fields=tuple(Field(str(n), int(o), int(s), int(c)) for n, o, s, c in d["fields"]),
        )


def describe_ctype(leaf: Any) -> tuple[Field, ...]:
    """The fields of a map value's ctypes type, as bcc builds it from the C struct (run in the build child).

    Unsigned integers and arrays of them only: every counter the program keeps is one."""
    if not (isinstance(leaf, type) and issubclass(leaf, ctypes.Structure)):
        return (Field("", 0, ctypes.sizeof(leaf), 1),)
    out = []
    for entry in leaf._fields_:
        name, ctype = entry[0], entry[1]
        offset = getattr(leaf, name).offset
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
            length = int(getattr(ctype, "_length_"))  # noqa: B009 (typeshed types it as a property)
            out.append(Field(name, offset, ctypes.sizeof(ctype) // length, length))
        else:
            out.append(Field(name, offset, ctypes.sizeof(ctype), 1))
    return tuple(out)
