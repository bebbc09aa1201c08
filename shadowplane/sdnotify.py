"""systemd service notifications (sd_notify): READY, STATUS, STOPPING and the watchdog.

The daemons' units are `Type=notify` with `WatchdogSec=`. Everything here is a silent no-op when the process
was not started by systemd (no $NOTIFY_SOCKET), so the daemons run the same by hand, in tests and in a
container.

Debian's python3-systemd (the `systemd` module) sends the messages when it is importable. Without it, a
few lines below speak the protocol directly (one datagram to $NOTIFY_SOCKET): a venv built without the
module must still tell systemd it is ready, or a `Type=notify` unit would time out and be killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_daemon: ModuleType | None
try:
    _daemon = importlib.import_module("systemd.daemon")
except ImportError:  # not installed: the fallback below speaks the protocol
    _daemon = None


def enabled() -> bool:
    """True when systemd (or whoever set $NOTIFY_SOCKET) listens for our notifications."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def _send_datagram(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.debug("sd_notify %r failed: %s", state, e)
        return False
    return True


def notify(state: str) -> bool:
    """Send one notification (e.g. "READY=1" or "STATUS=..."); False when nobody listens or it failed."""
    if not enabled():
        return False
    if _daemon is not None:
        try:
            return bool(_daemon.notify(state))
        except OSError as e:  # a vanished socket must never take a daemon down
            log.debug("sd_notify %r failed: %s", state, e)
            return False
    return _send_datagram(state)


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    # A newline would start a second assignment: STATUS is one line.
    return notify("STATUS=" + " ".join(text.split()))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def watchdog_interval() -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or None when
    no watchdog is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    # The variables are inherited by children (hooks, the BPF build helper); only the main process pings.
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


async def watchdog_task() -> None:
    """Ping the watchdog from the daemon's event loop until cancelled.

    It runs on the loop on purpose: a loop blocked by a hung call stops the pings, systemd kills the daemon
    with SIGABRT after WatchdogSec and `Restart=on-failure` starts it again.
    """
    interval = watchdog_interval()
    if interval is None or not enabled():
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def status_task(describe: Callable[[], str], every: float = 5.0) -> None:
    """Keep systemd's STATUS= (shown by `systemctl status`) current: send `describe()` when it changes."""
    if not enabled():
        return
    last = ""
    while True:
        with contextlib.suppress(Exception):  # a status line is never worth a crash
            text = describe()
            if text != last:
                status(text)
                last = text
        await asyncio.sleep(every)


async def serve_until_stopped(describe: Callable[[], str], work: asyncio.Task[None] | None = None) -> None:
    """The daemons' main wait: READY with a status line, STATUS updates and watchdog pings from this event
    loop, until SIGTERM/SIGINT, then STOPPING. If `work` ends first with an error, that error is raised: a
    daemon whose work died must exit (and be restarted), not idle on pinging the watchdog."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    helpers = [asyncio.create_task(watchdog_task()), asyncio.create_task(status_task(describe))]
    ready(describe())
    try:
        waiting: set[asyncio.Task[Any]] = {stopped} if work is None else {stopped, work}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        failure = work.exception() if work is not None and work.done() and not work.cancelled() else None
        if failure is not None:
            raise failure
    finally:
        stopping("stopping")
        for t in (*helpers, stopped):
            t.cancel()
