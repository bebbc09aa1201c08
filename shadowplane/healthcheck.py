"""Service health checks (TCP connect, HTTP GET, exec), run by the controller and by observer agents.

A probe answers one question once; `Tracker` turns a stream of probe results into up/down with rise/fall
hysteresis, so one lost packet does not move a service.

An exec check is configured on the host that runs it, like a hook: the controller's Watch names the check
(`check = "NAME"`), and the observer runs the command of its own `[checks.NAME]`, or reports that it cannot
check the target. A command line never travels over the network: whoever can talk to an agent as the
controller must not be able to make it run something as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shadowplane.config import check, valid_name
from shadowplane.v1 import agent_pb2 as apb


def _argv(v: list[str]) -> str | None:
    if not v or not v[0]:
        return 'must be the program and its arguments, e.g. ["/usr/local/bin/check-web", "--quick"]'
    return None


def detection_seconds(fall: int, interval: float, timeout: float) -> float:
    """How long checks take to see a target down: the first failing probe starts within one interval,
    `fall` of them fail in a row, and the last fails at its timeout."""
    return fall * interval + timeout


@dataclass
class ExecCheckConfig:
    """`[checks.NAME]` in agentd.toml (or controller.toml, for the controller's own probes): the command this
    host runs for a service whose `health.kind = "exec"` names `check = "NAME"`."""

    command: list[str] = field(
        metadata=check(
            _argv,
            doc="argv this host runs for the exec check NAME (exit 0: up); $SHADOWPLANE_TARGET_ADDRESS, "
            "$SHADOWPLANE_TARGET_HOST, $SHADOWPLANE_TARGET_PORT and $SHADOWPLANE_SERVICE name the target",
        )
    )


@dataclass(frozen=True)
class CheckSpec:
    service: str
    target: str  # host name
    address: str
    kind: str  # tcp | http | exec
    port: int = 80
    path: str = "/"
    expect_status: int = 200
    check: str = ""  # exec: the name of the observing host's own [checks.NAME]
    interval: float = 1.0
    timeout: float = 0.5
    fall: int = 3
    rise: int = 2


def spec_to_proto(s: CheckSpec) -> apb.HealthCheck:
    """How the controller hands a check to an observer agent (Watch)."""
    return apb.HealthCheck(
        service=s.service,
        target=s.target,
        address=s.address,
        kind=s.kind,
        port=s.port,
        path=s.path,
        expect_status=s.expect_status,
        check=s.check,
        interval_ms=round(s.interval * 1000),
        timeout_ms=round(s.timeout * 1000),
        fall=s.fall,
        rise=s.rise,
    )


def spec_from_proto(c: apb.HealthCheck) -> CheckSpec:
    return CheckSpec(
        service=c.service,
        target=c.target,
        address=c.address,
        kind=c.kind,
        port=c.port,
        path=c.path or "/",
        expect_status=c.expect_status or 200,
        check=c.check,
        interval=c.interval_ms / 1000,
        timeout=c.timeout_ms / 1000,
        fall=c.fall or 3,
        rise=c.rise or 2,
    )


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def probe_tcp(spec: CheckSpec) -> ProbeResult:
    """Connect, then close. A bare non-blocking socket, not a stream: a controller probes every target
    every 0.2 s (thousands a second in a fleet), and a stream's reader, writer, transport and the extra
    task of `wait_for` cost several times the connect itself (bench/health_probe.py)."""
    t0 = time.monotonic()
    family: socket.AddressFamily | None = None  # a name: resolved as a stream would
    with contextlib.suppress(ValueError):
        family = socket.AF_INET6 if ipaddress.ip_address(spec.address).version == 6 else socket.AF_INET
    try:
        async with asyncio.timeout(spec.timeout):
            if family is not None:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    await asyncio.get_running_loop().sock_connect(sock, (spec.address, spec.port))
                finally:
                    sock.close()
            else:
                _, writer = await asyncio.open_connection(spec.address, spec.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return ProbeResult(
            False, f"connect timeout after {spec.timeout * 1000:.0f} ms", time.monotonic() - t0
        )
    except OSError as e:
        return ProbeResult(False, f"connect failed: {e.strerror or e}", time.monotonic() - t0)
    return ProbeResult(True, "connected", time.monotonic() - t0)


async def probe_http(spec: CheckSpec) -> ProbeResult:
    t0 = time.monotonic()

    async def get() -> int:
        reader, writer = await asyncio.open_connection(spec.address, spec.port)
        try:
            host = _host(spec.address)
            writer.write(
                f"GET {spec.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: shadowplane\r\n\r\n".encode()
            )
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        parts = status_line.decode(errors="replace").split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {status_line[:60]!r}")
        return int(parts[1])

    try:
        status = await asyncio.wait_for(get(), spec.timeout)
    except TimeoutError:
        return ProbeResult(
            False, f"no HTTP response within {spec.timeout * 1000:.0f} ms", time.monotonic() - t0
        )
    except (OSError, ValueError) as e:
        return ProbeResult(False, f"HTTP failed: {e}", time.monotonic() - t0)
    ok = status == spec.expect_status
    return ProbeResult(
        ok, f"HTTP {status}" + ("" if ok else f", want {spec.expect_status}"), time.monotonic() - t0
    )


async def probe_exec(spec: CheckSpec, command: Sequence[str]) -> ProbeResult:
    """Run `command` (this host's own [checks.NAME]) with the target in its environment."""
    t0 = time.monotonic()
    env = dict(
        os.environ,
        SHADOWPLANE_SERVICE=spec.service,
        SHADOWPLANE_TARGET_HOST=spec.target,
        SHADOWPLANE_TARGET_ADDRESS=spec.address,
        SHADOWPLANE_TARGET_PORT=str(spec.port),
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        return ProbeResult(False, f"cannot run {command[0]}: {e.strerror}", time.monotonic() - t0)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), spec.timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        return ProbeResult(
            False, f"check command timed out after {spec.timeout:.1f} s", time.monotonic() - t0
        )
    except asyncio.CancelledError:
        # The check was withdrawn (a new Watch, the agent stopping): its command goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise
    tail = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
    ok = proc.returncode == 0
    return ProbeResult(
        ok, f"exit {proc.returncode}" + (f": {tail[0][:120]}" if tail[0] else ""), time.monotonic() - t0
    )


PROBES: dict[str, Callable[[CheckSpec], Coroutine[Any, Any, ProbeResult]]] = {
    "tcp": probe_tcp,
    "http": probe_http,
}

Probe = Callable[[], Coroutine[Any, Any, ProbeResult]]


def local_probe(spec: CheckSpec, checks: Mapping[str, ExecCheckConfig], config_file: str) -> Probe | str:
    """How this host probes `spec`: a probe, or why it cannot (a text naming the fix).

    An exec check runs only the command this host configured under the name the spec gives (`checks`, from
    `config_file`); nothing in the spec itself is ever run."""
    if spec.kind == "exec":
        local = checks.get(spec.check) if spec.check else None
        if local is None:
            name = spec.check or "NAME"
            return (
                f"cannot check {spec.target}: service {spec.service!r} uses the exec check {spec.check!r}, "
                f"which this host does not have: add [checks.{name}] with its command to {config_file}"
            )
        argv = tuple(local.command)
        return lambda: probe_exec(spec, argv)
    kind = PROBES.get(spec.kind)
    if kind is None:
        return f"cannot check {spec.target}: unknown check kind {spec.kind!r} (tcp, http or exec)"
    return lambda: kind(spec)


@dataclass
class Tracker:
    """Up/down with hysteresis: `fall` failures in a row make a target down, `rise` successes up again.
    Starts unknown; the first verdict needs `fall` or `rise` results."""

    fall: int
    rise: int
    up: bool | None = None
    streak_ok: int = 0
    streak_fail: int = 0
    since: float = field(default_factory=time.time)
    detail: str = "no result yet"

    def add(self, r: ProbeResult, now: float) -> bool:
        """Record one result; True if the verdict changed."""
        self.detail = r.detail
        if r.ok:
            self.streak_ok, self.streak_fail = self.streak_ok + 1, 0
            flip = self.up is not True and self.streak_ok >= self.rise
            new = True
        else:
            self.streak_fail, self.streak_ok = self.streak_fail + 1, 0
            flip = self.up is not False and self.streak_fail >= self.fall
            new = False
        if flip:
            self.up = new
            self.since = now
        return flip


async def run_check(
    spec: CheckSpec,
    probe: Probe,
    report: Callable[[CheckSpec, Tracker, bool], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Run `probe` (see `local_probe`) forever at the spec's interval; call `report(spec, tracker, changed)`
    after every probe.

    Probes start on a fixed cadence (not interval after the previous finished), so a slow failing probe
    does not slow detection down.
    """
    tracker = Tracker(spec.fall, spec.rise)
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    pending: set[asyncio.Task[ProbeResult]] = set()
    failed: list[Exception] = []

    # Each result is judged as its probe ends, in its task's callback: no queue and no timed wait per
    # probe (what made a probe cost several tasks and timers in a fleet's thousands a second).
    def done(t: asyncio.Task[ProbeResult]) -> None:
        pending.discard(t)
        if t.cancelled() or t.exception() is not None:
            return
        try:
            report(spec, tracker, tracker.add(t.result(), clock()))
        except Exception as e:  # the caller's bug ends the check, raised from here below
            failed.append(e)

    try:
        while not failed:
            t = loop.create_task(probe())
            pending.add(t)
            t.add_done_callback(done)
            next_at += spec.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        raise failed[0]
    finally:
        # Wait for the withdrawn probes to end: an exec probe cancelled while its process starts must reap
        # it before the loop stops (CPython 3.11's subprocess transport otherwise waits forever for a pipe
        # its own cancelled task never connected: an agent stop that hung until systemd killed it).
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(set(pending))


def exec_check_names(checks: dict[str, ExecCheckConfig]) -> str | None:
    """A `[checks.NAME]` name must be one a service can name (`health.check`)."""
    for name in checks:
        problem = valid_name(name)
        if problem:
            return f"checks.{name}: the check's name {problem}"
    return None
