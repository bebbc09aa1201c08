"""Hypothesis strategies for any protobuf message, built from its descriptor: every field, hostile values
(empty, huge, unicode, control characters, the extremes of each integer type, NaN and infinities, unknown
enum values, long repeated fields) mixed with the names of things that exist, so that fuzzing reaches both
the validation and the code behind it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor

INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

# No surrogates: a protobuf string is UTF-8, and the client library refuses to send anything else.
_CHARS = st.characters(blacklist_categories=("Cs",))
_CONTROL = st.text(st.sampled_from([chr(c) for c in [*range(0, 32), 127, 0x85, 0x2028, 0x202E]]), min_size=1)
_ODD = [
    "",
    " ",
    "../../etc/passwd",
    "a/b/c",
    "/",
    "%s%n",
    "'; DROP TABLE events; --",
    "é🙂\u202e\u200b",
    "\x00",
]


def strings(names: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Names that exist, odd ones, control characters, any unicode, and huge ones."""
    known = [st.sampled_from(list(names))] if names else []
    return st.one_of(
        *known,
        st.sampled_from(_ODD),
        _CONTROL,
        st.text(_CHARS, max_size=40),
        st.builds(lambda s, n: (s or "x") * n, st.text(_CHARS, max_size=3), st.sampled_from([300, 70_000])),
    )


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = {
        lo,
        hi,
        0,
        1,
        max(lo, -1),
        min(hi, 2**31),
        min(hi, 2**53 + 1),
        min(hi, 2**63),
        min(hi, 2**63 - 1),
    }
    return st.one_of(st.sampled_from(sorted(edges)), st.integers(lo, hi))


def floats() -> st.SearchStrategy[float]:
    specials = [math.nan, math.inf, -math.inf, -0.0, -1.0, 1e308, -1e308, 5e-324, 2.0**63]
    return st.one_of(st.sampled_from(specials), st.floats(allow_nan=True, allow_infinity=True))


def scalars(fd: FieldDescriptor, names: Sequence[str]) -> st.SearchStrategy[Any]:
    if fd.type == F.TYPE_STRING:
        return strings(names)
    if fd.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if fd.type == F.TYPE_BOOL:
        return st.booleans()
    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return floats()
    if fd.type == F.TYPE_ENUM:
        # proto3 enums are open: any int32 goes on the wire; the receiver sees numbers it does not know
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), integers(-(2**31), 2**31 - 1))
    lo, hi = INT_RANGES[fd.type]
    return integers(lo, hi)


def messages(
    descriptor: Descriptor,
    names: Sequence[str] = (),
    depth: int = 2,
    max_repeated: int = 5,
    long_repeated: int = 10_000,
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with each field left unset or set to a generated value; a repeated
    field may also be `long_repeated` copies of one value (0: never)."""
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        if fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            fields[fd.name] = st.dictionaries(
                scalars(key_fd, names), _value(value_fd, names, depth, long_repeated), max_size=max_repeated
            )
        elif fd.is_repeated:
            one = _value(fd, names, depth, long_repeated)
            lists = st.lists(one, max_size=max_repeated)
            fields[fd.name] = (
                st.one_of(lists, st.builds(lambda v: [v] * long_repeated, one)) if long_repeated else lists
            )
        else:
            fields[fd.name] = _value(fd, names, depth, long_repeated)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        m = cls()
        for name, strategy in fields.items():
            if not draw(st.booleans()):
                continue  # unset: the default (empty, 0) is a value worth sending too
            value = draw(strategy)
            fd = descriptor.fields_by_name[name]
            if fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
                target = getattr(m, name)
                for k, v in value.items():
                    if isinstance(v, Message):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif fd.is_repeated:
                getattr(m, name).extend(value)
            elif fd.type == F.TYPE_MESSAGE:
                getattr(m, name).CopyFrom(value)
            else:
                setattr(m, name, value)
        return m

    return build()


def _value(
    fd: FieldDescriptor, names: Sequence[str], depth: int, long_repeated: int
) -> st.SearchStrategy[Any]:
    if fd.type != F.TYPE_MESSAGE:
        return scalars(fd, names)
    if depth <= 0:
        return st.just(GetMessageClass(fd.message_type)())
    return messages(fd.message_type, names, depth - 1, long_repeated=long_repeated)


def near(valid: Message, names: Sequence[str] = ()) -> st.SearchStrategy[Message]:
    """`valid` with some of its fields replaced by generated ones: requests that get past the first
    checks (a service or workload that exists) and carry a hostile value deeper in."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        fuzzed = draw(messages(valid.DESCRIPTOR, names))
        m = type(valid)()
        m.CopyFrom(valid)
        for fd in valid.DESCRIPTOR.fields:
            if draw(st.booleans()):
                m.ClearField(fd.name)
                if fd.is_repeated or fd.type == F.TYPE_MESSAGE:
                    getattr(m, fd.name).MergeFrom(getattr(fuzzed, fd.name))
                else:
                    setattr(m, fd.name, getattr(fuzzed, fd.name))
        return m

    return build()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def wire(descriptor: Descriptor, names: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    """Bytes sent as `descriptor`'s message that a protobuf library would never encode: random bytes, an
    encoded message with one byte changed or cut short, a string that is not UTF-8, a field of the wrong
    wire type, a field number the message does not have."""
    encoded = messages(descriptor, names, depth=1).map(lambda m: m.SerializeToString())
    numbers = [fd.number for fd in descriptor.fields] or [1]
    strings_ = [fd.number for fd in descriptor.fields if fd.type == F.TYPE_STRING] or [1]

    def corrupt(data: bytes, at: int, byte: int) -> bytes:
        if not data:
            return bytes([byte])
        i = at % len(data)
        return data[:i] + bytes([byte]) + data[i + 1 :]

    def cut(data: bytes, at: int) -> bytes:
        return data[: at % (len(data) + 1)]

    return st.one_of(
        st.binary(max_size=64),
        st.builds(corrupt, encoded, st.integers(0, 2**16), st.integers(0, 255)),
        st.builds(cut, encoded, st.integers(0, 2**16)),
        st.builds(  # invalid UTF-8 in a string field
            lambda n, b: _field(n, 2, _varint(len(b)) + b),
            st.sampled_from(strings_),
            st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"]),
        ),
        st.builds(  # the wrong wire type (varint, 64-bit, length-delimited, 32-bit) for a field
            lambda n, t, p: _field(n, t, p),
            st.sampled_from(numbers),
            st.sampled_from([0, 1, 2, 5]),
            st.sampled_from([b"\x01", b"\x00" * 8, b"\x03abc", b"\x00" * 4, b"\xff" * 10]),
        ),
        st.builds(lambda n: _field(n, 0, b"\x01"), st.integers(100, 2**29 - 1)),  # an unknown field
    )
