"""TOML configuration into typed dataclasses, with errors that name the field and say how to fix it.

Each daemon declares its configuration as dataclasses; `load(cls, path)` reads the file, checks every key
(unknown keys too: a typo must not silently fall back to a default) and returns the dataclass. Constraints
that one type cannot express live in the field's metadata:

    interval_seconds: float = field(default=10.0, metadata=check(positive, "seconds between samples"))
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A configuration problem: where it is, what is wrong, what to do."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source, self.field, self.problem = source, field, problem
        super().__init__(f"{source}: {field}: {problem}" if field else f"{source}: {problem}")


def check(*checks: Check, doc: str = "", default_doc: str = "") -> dict[str, Any]:
    """Field metadata: validators (each returns an error text or None), a one-line description and, for
    defaults computed at run time, how to describe them."""
    return {"checks": checks, "doc": doc, "default_doc": default_doc}


# ---- common validators ----


def positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


def between(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def non_empty(v: Any) -> str | None:
    return None if v else "must not be empty"


# Host, service, workload and check names, wherever they appear (configs, the Fleet API, the agent stream).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def valid_name(v: str) -> str | None:
    return None if NAME_RE.match(v) else f"must be 1-63 of letters, digits, '_', '.', '-', got {v!r}"


def host_port(v: Any) -> str | None:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be HOST:PORT (e.g. 127.0.0.1:7400), got {v!r}"
    return None


def absolute_path(v: Any) -> str | None:
    return None if str(v).startswith("/") else f"must be an absolute path starting with '/', got {v!r}"


def repeated(values: Iterable[T]) -> T | None:
    """The first value that occurs twice (for "names must be unique" checks in `validate`)."""
    seen: set[T] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


# ---- the loader ----


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is str or tp is Path:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, src: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, src, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(src, where, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(src, where, f"must be one of {allowed}, got {value!r}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(src, where, f"must be a table, got {value!r}")
        return build(typing.cast(type, tp), value, src, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(src, where, f"must be a list, got {value!r}")
        return [_convert(args[0], v, src, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(src, where, f"must be a table, got {value!r}")
        return {str(k): _convert(args[1], v, src, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(src, where, f"must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(src, where, f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(src, where, f"must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(src, where, f"must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(src, where, f"must be a path string, got {value!r}")
        return Path(value)
    raise TypeError(f"config type {tp!r} at {where} is not supported")


def build(cls: type[T], data: Mapping[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Turn a parsed TOML table into `cls`, checking every key."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # Keys a class no longer takes, with what replaced them: an old file gets the new form, not a guess.
    retired: Mapping[str, str] = getattr(cls, "RETIRED_KEYS", {})
    for key in data:
        if key in retired:
            raise ConfigError(source, f"{prefix}.{key}".lstrip("."), retired[key])
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(fields))})"
            )
            raise ConfigError(source, f"{prefix}.{key}".lstrip("."), f"unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}".lstrip(".")
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, where, f"is required ({_type_name(hints[name])})")
            continue
        value = _convert(hints[name], data[name], source, where)
        for c in f.metadata.get("checks", ()):
            problem = c(value)
            if problem:
                raise ConfigError(source, where, problem)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        problem = validate()
        if problem:
            field, _, text = problem.partition(": ")
            raise ConfigError(source, f"{prefix}.{field}".lstrip("."), text)
    return typing.cast(T, obj)


def load(cls: type[T], path: str | Path) -> T:
    """Read and check a TOML file. A missing or unreadable file, or a syntax error, is a ConfigError too."""
    src = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(src, "", "file not found (pass --config PATH, or create it)") from None
    except OSError as e:
        raise ConfigError(src, "", f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(src, "", f"not valid TOML: {e}") from None
    return build(cls, data, src)


def toml_value(v: Any) -> str:
    """How a default looks when written in the TOML file."""
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def reference(cls: type[Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every key: the README's config reference is made from this."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}".lstrip(".")
        tp = hints[f.name]
        sub = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if typing.get_origin(tp) is dict:  # [key.NAME] tables, each one dataclass
            sub, key = typing.get_args(tp)[1], f"{key}.<name>"
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # an optional table: its keys
            sub = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(sub):
            rows.extend(reference(typing.cast(type, sub), key))
            continue
        if f.metadata.get("default_doc"):
            default = f.metadata["default_doc"]
        elif f.default is not dataclasses.MISSING:
            default = toml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = toml_value(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, default, f.metadata.get("doc", "")))
    return rows
