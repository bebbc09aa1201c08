"""Workloads that are systemd units: their cgroup, their limits, and slices made ahead of demand, through
systemd's D-Bus API (org.freedesktop.systemd1(5)).

On a systemd host the cgroup tree is systemd's: a limit written into a unit's cgroup directly is undone by
the next `systemctl daemon-reload`, and a controller systemd did not enable has no files to write. Limits set
as the unit's runtime properties (Manager.SetUnitProperties with runtime=true, what `systemctl set-property
--runtime` does) are systemd's own: it enables the controllers they need, writes the cgroup files, and keeps
them in a drop-in under /run/systemd/system.control/ that reloads read again and a reboot forgets.

The D-Bus library is jeepney: pure Python without dependencies (one small py3-none-any wheel in the packaged
venv, no libdbus or GLib main loop as dbus-python needs), maintained (0.9, 2025; the D-Bus layer of keyring
and SecretStorage), in Debian (python3-jeepney), and with both a blocking and an asyncio API. The agent's
limit calls run in worker threads (a command, the sampler), so the blocking one serves: a few calls every
interval at most. dbus-next is unmaintained since 2021; dbus-fast is asyncio-only and ships compiled
wheels; sdbus needs libsystemd at build or wheel time.

Everything that talks to the bus is `DBusUnits`, behind the small `Units` interface; the rest (property
mapping, cgroup paths, error texts) is pure and tested here. The bus is tested for real against systemd 252
in the VM suite (tests/vm).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

from agentd.actuate.limits import CPU_PERIOD_US, Limits
from agentd.config import WorkloadConfig

log = logging.getLogger(__name__)

UINT64_MAX = (1 << 64) - 1  # systemd's "infinity" for MemoryMax=, MemoryHigh=, CPUQuotaPerSecUSec=
USEC_PER_SEC = 1_000_000
CALL_TIMEOUT_SECONDS = 10.0  # systemd answers in milliseconds; it may be busy with a reload

Property = tuple[str, tuple[str, Any]]  # (name, (D-Bus signature, value)): one a(sv) element


class SystemdError(RuntimeError):
    pass


class SystemdUnreachable(SystemdError):
    """No systemd on the bus: every call would fail alike."""


@dataclass(frozen=True)
class UnitState:
    load_state: str  # loaded, not-found, masked, ...
    active_state: str  # active, inactive, failed, activating, ...
    control_group: str  # "" while the unit has no cgroup (not running)
    slice: str  # the slice a service or scope runs in ("" for a slice)


class Units(Protocol):
    """What the agent asks of systemd."""

    def state(self, unit: str) -> UnitState: ...

    def set_properties(self, unit: str, properties: list[Property]) -> None:
        """Set runtime properties (lost at reboot). Raises SystemdError."""
        ...

    def start_slice(self, unit: str, properties: list[Property]) -> None:
        """Start a slice: its unit file if it has one, else a transient one. Raises SystemdError."""
        ...


# ---- pure parts ----


def unit_properties(want: Limits) -> list[Property]:
    """systemd's properties for `want`, in its D-Bus types (org.freedesktop.systemd1(5), "Unit objects").
    Unlimited is UINT64_MAX ("infinity"). CPUQuotaPerSecUSec is CPU time per second of wall time; systemd
    writes cpu.max as that times the period (100 ms, its default and ours) over 1 s, so a quota in our steps
    comes back exactly. An io weight of 0 leaves IOWeight as it is."""
    props: list[Property] = [
        (
            "CPUQuotaPerSecUSec",
            ("t", want.cpu_quota_us * USEC_PER_SEC // CPU_PERIOD_US if want.cpu_quota_us else UINT64_MAX),
        ),
        ("MemoryMax", ("t", want.memory_max or UINT64_MAX)),
        ("MemoryHigh", ("t", want.memory_high or UINT64_MAX)),
    ]
    if want.io_weight:
        props.append(("IOWeight", ("t", want.io_weight)))
    return props


def slice_path(unit: str) -> str:
    """The cgroup of a slice: each dash a level (systemd.slice(5)): a-b.slice -> /a.slice/a-b.slice."""
    stem = unit.removesuffix(".slice")
    if stem in ("", "-"):
        return "/"
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def unit_cgroup(unit: str, state: UnitState) -> str:
    """Where the unit's cgroup is, or will be once it runs."""
    if state.control_group:
        return state.control_group
    if unit.endswith(".slice"):
        return slice_path(unit)
    if state.load_state != "loaded":
        raise SystemdError(
            f"unit {unit} is {state.load_state}: install it (or fix `unit`), or name a slice instead "
            f'(unit = "{unit.rsplit(".", 1)[0]}.slice"), which the agent creates, and run the service in it '
            "with Slice= in its unit file"
        )
    return f"{slice_path(state.slice or 'system.slice').rstrip('/')}/{unit}"


def explain(error_name: str, message: str, unit: str) -> str:
    """A D-Bus error from systemd, with what to do about it."""
    if error_name.endswith((".AccessDenied", ".InteractiveAuthorizationRequired")):
        return (
            f"systemd refused to change {unit}: {message}; the agent must run as root (User=root, as the "
            "packaged unit does) to set unit properties"
        )
    if error_name.endswith(".NoSuchUnit") or error_name.endswith(".LoadFailed"):
        return f"{message}: install the unit, or name a slice the agent can create"
    return f"systemd: {message} ({error_name})"


class SystemdWriter:
    """Sets a unit's limits through systemd (agentd.actuate.limits.LimitsWriter)."""

    def __init__(self, units: Units, unit: str) -> None:
        self.units, self.unit = units, unit

    def write(self, want: Limits) -> dict[str, str]:
        props = unit_properties(want)
        try:
            self.units.set_properties(self.unit, props)
            return {name: "" for name, _ in props}
        except SystemdUnreachable as e:
            return {name: str(e) for name, _ in props}
        except SystemdError:
            pass
        # systemd applies a call all or nothing: try each alone, so the others are set and each is told apart
        out = {}
        for prop in props:
            try:
                self.units.set_properties(self.unit, [prop])
                out[prop[0]] = ""
            except SystemdError as e:
                out[prop[0]] = str(e)
        return out


def prepare(units: Units, w: WorkloadConfig) -> str:
    """The workload's cgroup path; a shadow's slice that is not running is started first, so that its
    limits can be set ahead of demand (and the service started in it later)."""
    state = units.state(w.unit)
    if w.unit.endswith(".slice") and w.role == "shadow" and state.active_state != "active":
        units.start_slice(w.unit, [("Description", ("s", f"Shadowplane shadow workload {w.name}"))])
        log.info("workload %s: started slice %s for its limits", w.name, w.unit)
        state = units.state(w.unit)
    return unit_cgroup(w.unit, state)


# ---- the bus ----

MANAGER_PATH = "/org/freedesktop/systemd1"
SYSTEMD = "org.freedesktop.systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
TYPE_INTERFACE = {"service": "Service", "slice": "Slice", "scope": "Scope"}


class DBusUnits:
    """systemd on the system bus (or `bus`, a D-Bus address). One connection, one call at a time."""

    def __init__(self, bus: str = "SYSTEM") -> None:
        self.bus = bus
        self._conn: Any = None
        self._lock = threading.Lock()

    def _call(self, path: str, interface: str, method: str, signature: str, body: tuple[Any, ...]) -> Any:
        msg = new_method_call(DBusAddress(path, SYSTEMD, interface), method, signature, body)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = open_dbus_connection(self.bus)
                    reply = self._conn.send_and_get_reply(msg, timeout=CALL_TIMEOUT_SECONDS)
                    break
                except (OSError, TimeoutError) as e:  # a dropped connection (dbus restarted): once more
                    self.close_locked()
                    if attempt == 2:
                        raise SystemdUnreachable(
                            f"cannot reach systemd on the D-Bus system bus ({e}): is systemd this host's "
                            'init? Without it, name the workload by its cgroup (cgroup = "/...") instead '
                            "of `unit`"
                        ) from None
        if reply.header.message_type == MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, ""))
            text = str(reply.body[0]) if reply.body else name
            raise SystemdError(explain(name, text, str(body[0]) if body else ""))
        return reply.body

    def close_locked(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    def _get(self, path: str, interface: str, name: str) -> Any:
        (variant,) = self._call(path, "org.freedesktop.DBus.Properties", "Get", "ss", (interface, name))
        return variant[1]

    def state(self, unit: str) -> UnitState:
        # LoadUnit, not GetUnit: it answers for units systemd has not loaded yet (e.g. a stopped service)
        (path,) = self._call(MANAGER_PATH, MANAGER, "LoadUnit", "s", (unit,))
        kind = TYPE_INTERFACE[unit.rsplit(".", 1)[1]]
        load = str(self._get(path, UNIT, "LoadState"))
        active = str(self._get(path, UNIT, "ActiveState"))
        cgroup = str(self._get(path, f"{SYSTEMD}.{kind}", "ControlGroup")) if load == "loaded" else ""
        slice_ = (
            str(self._get(path, f"{SYSTEMD}.{kind}", "Slice")) if load == "loaded" and kind != "Slice" else ""
        )
        return UnitState(load, active, cgroup, slice_)

    def set_properties(self, unit: str, properties: list[Property]) -> None:
        self._call(MANAGER_PATH, MANAGER, "SetUnitProperties", "sba(sv)", (unit, True, properties))

    def start_slice(self, unit: str, properties: list[Property]) -> None:
        if self.state(unit).load_state == "loaded":
            self._call(MANAGER_PATH, MANAGER, "StartUnit", "ss", (unit, "fail"))
        else:
            self._call(
                MANAGER_PATH,
                MANAGER,
                "StartTransientUnit",
                "ssa(sv)a(sa(sv))",
                (unit, "fail", properties, []),
            )
