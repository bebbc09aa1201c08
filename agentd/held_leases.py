"""The leases an agent held when it stopped, kept for the next start on the same boot (`lease_state_file`).

A stopping agent (SIGTERM: `systemctl stop` or `restart`) stops renewing but leaves its addresses in place:
each keeps the kernel lifetime of its last renewal, which removes it as for a hung agent, and a move that
cannot hear this owner waits that lifetime out (shadowplane.lease.address_expiry_seconds). It records here
what it held. The next start, before anything slow, resumes each record that may be resumed
(`resume_problem`, pure) by renewing the same token with the same observers: the observers decide, exactly
as for any renewal (only the token they last voted for, only for its candidate), so a token that was
superseded meanwhile is refused and its address removed. Nothing here can make an owner; it only lets the
one the observers still grant keep its address across a restart.

The file is read once and removed at once: a record is resumed at most once, and an agent that dies
without a clean stop leaves no file, so the unit's `release-all` removes its addresses as before.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FORMAT = 1
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


class StateFileError(ValueError):
    pass


@dataclass(frozen=True)
class HeldLease:
    """One lease as its owner held it when it stopped: enough to renew it again without the controller."""

    service: str
    token: int
    host: str  # the holder's name, as it renews (a record of another host is never resumed)
    vip: str  # ADDRESS/PREFIX, "" for a DNS-only service
    interface: str
    observers: tuple[str, ...]  # addresses, as resolved when the lease was acquired
    observer_names: tuple[str, ...]  # the names each must prove (TLS), "" from an older controller
    lease_ms: int
    renew_interval_ms: int
    drift_margin: float
    garp_count: int
    garp_interval_ms: int
    valid_until: float  # the owner's deadline, time.monotonic() on the boot below
    stopped_at: float  # when the agent stopped renewing, time.monotonic()
    boot_id: str  # /proc/sys/kernel/random/boot_id: monotonic times mean nothing on another boot


def resume_problem(held: HeldLease, host: str, boot_id: str, now: float) -> str | None:
    """Why `held` must not be resumed by `host` now (None: renew it with its observers, who decide).

    Pure. The observers are the authority on whether the token is still this host's; these rules only
    refuse what cannot be this host's lease of this boot: another boot (the address is gone with the
    reboot and the monotonic times are meaningless), another host, a record from the future (a clock or
    file that is not what it claims)."""
    if not boot_id or held.boot_id != boot_id:
        return f"recorded on another boot (boot id {held.boot_id or '?'}, now {boot_id or '?'})"
    if held.host != host:
        return f"recorded by host {held.host!r}, this is {host!r}"
    if held.token <= 0:
        return f"token {held.token} is not a granted token"
    if not held.observers or (held.observer_names and len(held.observer_names) != len(held.observers)):
        return "no usable observer list"
    if held.stopped_at > now or held.valid_until > now + held.lease_ms / 1000:
        return "recorded in the future on this boot's clock"
    return None


def paused_seconds(held: HeldLease, now: float) -> float:
    """How long renewals of `held` were paused by the restart (stop to now)."""
    return max(0.0, now - held.stopped_at)


def boot_id(path: Path = BOOT_ID_FILE) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def dumps(held: list[HeldLease]) -> str:
    return json.dumps({"format": FORMAT, "leases": [asdict(h) for h in held]}, indent=1)


def loads(text: str) -> list[HeldLease]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise StateFileError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError(
            f"format {doc.get('format') if isinstance(doc, dict) else '?'}, expected {FORMAT}"
        )
    out = []
    names = {f.name for f in fields(HeldLease)}
    for i, raw in enumerate(doc.get("leases") or []):
        if not isinstance(raw, dict) or set(raw) != names:
            raise StateFileError(f"leases[{i}]: fields {sorted(raw) if isinstance(raw, dict) else raw!r}")
        try:
            out.append(_record(raw))
        except (TypeError, ValueError) as e:
            raise StateFileError(f"leases[{i}]: {e}") from None
    return out


def _record(raw: dict[str, Any]) -> HeldLease:
    return HeldLease(
        service=str(raw["service"]),
        token=int(raw["token"]),
        host=str(raw["host"]),
        vip=str(raw["vip"]),
        interface=str(raw["interface"]),
        observers=tuple(str(o) for o in raw["observers"]),
        observer_names=tuple(str(o) for o in raw["observer_names"]),
        lease_ms=int(raw["lease_ms"]),
        renew_interval_ms=int(raw["renew_interval_ms"]),
        drift_margin=float(raw["drift_margin"]),
        garp_count=int(raw["garp_count"]),
        garp_interval_ms=int(raw["garp_interval_ms"]),
        valid_until=float(raw["valid_until"]),
        stopped_at=float(raw["stopped_at"]),
        boot_id=str(raw["boot_id"]),
    )


def save(path: Path, held: list[HeldLease]) -> None:
    """Write atomically (a reader sees the old file or the new one), readable by root only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".leases-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(held))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError(str(e)) from None


def peek(path: Path) -> list[HeldLease]:
    """The records, leaving the file (`release-all` reads what the next start will resume). A missing file
    is no records."""
    text = _read(path)
    return [] if text is None else loads(text)


def take(path: Path) -> list[HeldLease]:
    """The records, removing the file first: each is resumed at most once, and an agent that dies while
    resuming leaves none behind for `release-all` to keep."""
    text = _read(path)
    if text is None:
        return []
    path.unlink(missing_ok=True)
    return loads(text)
