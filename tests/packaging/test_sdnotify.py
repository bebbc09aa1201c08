"""sd_notify (READY/STATUS/WATCHDOG) against a fake $NOTIFY_SOCKET, and the journal log handler's fields."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowplane import logs, sdnotify
from tests.support import need


class FakeSystemd:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # A thread, so arrival times are recorded even while the test blocks the event loop.
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        time.sleep(0.1)  # let the reader catch up
        return [m for _, m in self.received]

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(params=["python-systemd", "fallback"])
def fake_systemd(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeSystemd]:
    if request.param == "python-systemd":
        need(
            sdnotify._daemon is not None,
            "systemd-python is not installed",
            "make setup installs it (the venv's `systemd` extra: pip install -e '.[systemd]')",
        )
    else:
        monkeypatch.setattr(sdnotify, "_daemon", None)
    fake = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        yield fake
    finally:
        fake.close()


def test_ready_status_stopping(fake_systemd: FakeSystemd) -> None:
    assert sdnotify.ready("2 workloads")
    assert sdnotify.status("controller\nconnected")
    assert sdnotify.stopping()
    assert fake_systemd.messages() == [
        "READY=1\nSTATUS=2 workloads",
        "STATUS=controller connected",
        "STOPPING=1",
    ]


def test_watchdog_pings_from_the_loop_and_stops_when_it_blocks(fake_systemd: FakeSystemd) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(sdnotify.watchdog_task())
        await asyncio.sleep(0.3)
        time.sleep(0.5)  # a hung loop: no pings may arrive meanwhile
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(scenario())
    pings = [t for t, m in fake_systemd.received if m == "WATCHDOG=1"]
    assert len(pings) >= 6, fake_systemd.received
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 0.45, gaps  # the blocked half second shows as one long silence
    assert sorted(gaps)[len(gaps) // 2] < 0.15  # otherwise every ~50 ms


def test_status_task_sends_changes_only(fake_systemd: FakeSystemd) -> None:
    values = iter(["a", "a", "b", "b", "b"])

    async def scenario() -> None:
        task = asyncio.create_task(sdnotify.status_task(lambda: next(values, "b"), every=0.01))
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert fake_systemd.messages() == ["STATUS=a", "STATUS=b"]


def test_everything_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    assert not sdnotify.ready()
    assert not sdnotify.notify("WATCHDOG=1")
    # returns at once instead of pinging nobody forever
    asyncio.run(asyncio.wait_for(sdnotify.watchdog_task(), 1))


def test_watchdog_is_for_the_main_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # inherited by a hook or the BPF build helper
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.watchdog_interval() is None


def test_a_vanished_socket_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    monkeypatch.setattr(sdnotify, "_daemon", None)
    assert not sdnotify.ready()


def test_journal_handler_sends_structured_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        journal: Any = importlib.import_module("systemd.journal")
    except ImportError:
        journal = None
    need(
        journal is not None,
        "systemd-python is not installed",
        "make setup installs it (the venv's `systemd` extra: pip install -e '.[systemd]')",
    )
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(journal, "send", lambda message, **fields: sent.append((message, fields)))
    handler = logs.journal_handler("controller")
    assert handler is not None
    log = logging.getLogger("test.journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(
            "moved %s to %s",
            "web",
            "web-2",
            extra={"SERVICE": "web", "HOST": "web-2", "EVENT_KIND": "failover"},
        )
    finally:
        log.removeHandler(handler)
    ((message, fields),) = sent
    assert message == "moved web to web-2"
    assert fields["SHADOWPLANE_COMPONENT"] == "controller"
    assert fields["SYSLOG_IDENTIFIER"] == "shadowplane-controller"
    assert fields["PRIORITY"] == "4"
    assert (fields["SERVICE"], fields["HOST"], fields["EVENT_KIND"]) == ("web", "web-2", "failover")
    assert fields["LOGGER"] == "test.journal"
    assert not [k for k in fields if not k.isupper()], "lower-case record attributes must not reach journald"


def test_stderr_is_journal_checks_the_descriptor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as err:
        st = os.fstat(err.fileno())
        monkeypatch.setattr("sys.stderr", err)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited, not ours
        assert not logs.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.stderr_is_journal()


def test_component_names() -> None:
    assert logs.component_name("/usr/bin/shadowplane-agentd") == "agentd"
    assert logs.component_name("/opt/shadowplane/venv/bin/shadowplane-controller") == "controller"
    assert logs.component_name("shadowctl") == "shadowctl"
