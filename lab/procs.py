"""Starting and stopping Shadowplane processes for demos, the lab and tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# The checkout this file is in. The lab is not installed (the packages and the editable install leave it
# out), so a child running `python -m lab.httpd` finds it only through PYTHONPATH, whatever its cwd.
CHECKOUT = Path(__file__).resolve().parent.parent


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the checkout first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(CHECKOUT)]
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *rest])
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def spawn(
    argv: Sequence[str],
    log_path: Path | None = None,
    netns: str | None = None,
    cgroup_procs: Sequence[Path] = (),
) -> subprocess.Popen[bytes]:
    """Start a process (optionally in a network namespace, optionally in cgroups), logging to a file. It
    can import the lab (`child_env`)."""
    cmd = list(argv)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)

    def enter_cgroups() -> None:
        for procs in cgroup_procs:
            procs.write_text(str(os.getpid()))

    try:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=enter_cgroups if cgroup_procs else None,
            env=child_env(),
        )
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def run_until_stopped(seconds: float = 0.0) -> None:
    """Block until SIGTERM, SIGINT or `seconds` (0: no limit): the life of a lab tool run as a process."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    end = time.monotonic() + seconds if seconds else float("inf")
    with contextlib.suppress(KeyboardInterrupt):
        while not done.wait(0.1) and time.monotonic() < end:
            pass
