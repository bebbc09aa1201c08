"""Logging set-up shared by the daemons and the CLI.

On a terminal (or any plain stderr) lines look like `2025-01-01 12:00:00,000 INFO agentd.daemon: ...`.
Under systemd, whose journal already stamps time, unit and priority, records go to the journal natively
instead, with structured fields: PRIORITY from the level, LOGGER, CODE_FILE/CODE_LINE/CODE_FUNC,
SHADOWPLANE_COMPONENT (agentd, controller, shadowctl), and every upper-case `extra=` field a caller passes:

    log.warning("moved %s to %s", svc, host, extra={"SERVICE": svc, "HOST": host, "EVENT_KIND": "failover"})

so that `journalctl SHADOWPLANE_COMPONENT=controller SERVICE=web` finds them.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

TARGETS: tuple[str, ...] = ("auto", "stderr", "journal")
TARGET_ENV = "SHADOWPLANE_LOG_TARGET"
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_shadowplane_handler"
# journal field names: upper-case letters, digits and "_", not starting with "_" (trusted fields) or a digit
_FIELD_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")

# command name -> SHADOWPLANE_COMPONENT
_COMPONENTS = {
    "shadowplane-agentd": "agentd",
    "shadowplane-controller": "controller",
    "shadowctl": "shadowctl",
}


def component_name(argv0: str | None = None) -> str:
    """Which part of Shadowplane this process is, from the command it was started as."""
    name = Path(argv0 if argv0 is not None else sys.argv[0]).name
    return _COMPONENTS.get(name, name.removesuffix(".py") or "shadowplane")


def stderr_is_journal() -> bool:
    """True when our stderr is the journal stream systemd connected.

    $JOURNAL_STREAM alone is not enough: children inherit it (a hook started by the agent, a `shadowctl`
    in a script run by a unit) even when their stderr is a pipe or a file, so the device and inode it names
    must be those of our stderr (the check sd_journal_stream_fd(3) recommends).
    """
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = stream.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # stderr closed or replaced by a non-file object
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _journal_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Only what the journal accepts as a field: JournalHandler passes every attribute of the log record,
    and the lower-case ones (msg, args, levelname, ...) would be dropped by journald or duplicate MESSAGE."""
    return {k: v for k, v in fields.items() if _FIELD_RE.match(k) and v is not None}


def journal_handler(component: str) -> logging.Handler | None:
    """A handler that writes to the journal with our fields, or None when python3-systemd is missing."""
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None

    def send(message: str, /, **fields: Any) -> None:  # the record has a "message" attribute too
        journal.send(message, **_journal_fields(fields))

    command = next((c for c, comp in _COMPONENTS.items() if comp == component), component)
    handler: logging.Handler = journal.JournalHandler(
        sender_function=send, SYSLOG_IDENTIFIER=command, SHADOWPLANE_COMPONENT=component
    )
    # The journal has its own time, priority and LOGGER field: the text is the message alone.
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup(level: str = "info", target: str | None = None, component: str | None = None) -> str:
    """Configure the root logger; returns where logs go ("stderr", "journal", or "unchanged").

    target: "journal", "stderr" or "auto" (journal when stderr is systemd's journal stream); None reads
    $SHADOWPLANE_LOG_TARGET, default auto. Like logging.basicConfig, it leaves a root logger that someone
    else already configured (pytest's capture, an embedding program) alone.
    """
    root = logging.getLogger()
    # grpc's own chatter is not ours to report at info
    logging.getLogger("grpc").setLevel(logging.WARNING)
    ours = [h for h in root.handlers if getattr(h, _MARK, False)]
    if len(ours) != len(root.handlers):
        return "unchanged"
    chosen = target or os.environ.get(TARGET_ENV, "") or "auto"
    if chosen not in TARGETS:
        chosen = "auto"
    use_journal = chosen == "journal" or (chosen == "auto" and stderr_is_journal())
    handler = journal_handler(component or component_name()) if use_journal else None
    where = "journal" if handler is not None else "stderr"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    setattr(handler, _MARK, True)
    for h in ours:  # setup() may run twice in one process (tests, a CLI calling a daemon's main)
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if use_journal and where != "journal":
        logging.getLogger(__name__).warning(
            "logging to stderr: the journal needs python3-systemd (apt-get install python3-systemd)"
        )
    return where


class Throttle:
    """Whether to log a condition that repeats (the same bad input, every second): the first time for each
    key, then at most once per `seconds`. Calling it returns None to stay quiet, else how many occurrences
    were not logged since the last line."""

    def __init__(
        self, seconds: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024
    ) -> None:
        self.seconds, self.clock, self.max_keys = seconds, clock, max_keys
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (last logged, quiet since)

    def __call__(self, key: Hashable) -> int | None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.seconds:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # forgetting only means logging a key once more
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0
