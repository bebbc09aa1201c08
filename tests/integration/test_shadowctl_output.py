"""What `shadowctl top` and `shadowctl plan` write when their output is not a terminal (a pipe: a script,
cron, `| less`) and when it is: the real command in a subprocess against a real controller on loopback."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from controller.scaling.decision import ScalingDecision
from controller.server import Controller, start
from lab.procs import free_port
from shadowplane.clock import now_ms
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb
from tests.support import fleet_api_config

ROOT = Path(__file__).resolve().parents[2]
NARROW = 80  # what rich assumes when it cannot ask a terminal


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return dict(e, PYTHONPATH=str(ROOT))


def shadowctl_argv(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "shadowctl.cli", "--plaintext", "--controller", f"127.0.0.1:{port}", *args]


def piped(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """shadowctl with stdin, stdout and stderr pipes (no terminal anywhere)."""
    return subprocess.run(
        shadowctl_argv(port, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        stdin=subprocess.PIPE,
    )


def in_terminal(port: int, columns: int, *args: str) -> tuple[int, str]:
    """shadowctl with its stdout on a pseudo-terminal `columns` wide; returns its exit code and output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    p = subprocess.Popen(shadowctl_argv(port, *args), stdout=follower, stderr=subprocess.PIPE, env=env())
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.decode(errors="replace"))  # colours and bold take no columns
    return p.wait(timeout=60), text.replace("\r\n", "\n")


async def fleet_with_data(tmp_path: Path, port: int) -> Controller:
    c = await start(fleet_api_config(tmp_path, port))
    for host, role in (("p1", tpb.ROLE_PRIMARY), ("s1", tpb.ROLE_SHADOW)):
        hello = apb.Hello(
            host=host,
            instance_id=f"{host}-1",
            workloads=[tpb.WorkloadInfo(name="web", cgroup="/web", role=role, service="web")],
        )
        c.store.register_agent(hello, "peer", now_ms())
    sample = tpb.WorkloadSample(
        workload="web", cgroup="/web", start_unix_ms=now_ms() - 1000, end_unix_ms=now_ms()
    )
    sample.syscalls.total = 4000
    sample.syscalls.by_name["read"] = 3000
    sample.resources.cpu_seconds = 0.5
    c.store.append_batch("p1", "p1-1", apb.TelemetryBatch(seq=1, samples=[sample]), now_ms())
    d = ScalingDecision(
        now_ms(), "web", "s1", "web", "cpu", "p1/web", {"q0.5": 0.4, "q0.99": 0.9}, 0.6, 1.0, 0.8,
        "remove", clamps="floor", forecast_source="model", result="applied", applied=0.8,
    )  # fmt: skip
    c.store.add_decisions([d])
    return c


def test_top_without_a_terminal_prints_one_snapshot_and_exits(tmp_path: Path) -> None:
    async def scenario() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        port = free_port()
        c = await fleet_with_data(tmp_path, port)
        try:
            once = await asyncio.to_thread(piped, port, "top")
            twice = await asyncio.to_thread(piped, port, "top", "--iterations", "2", "--interval", "0.1")
        finally:
            await c.stop()
        return once, twice

    once, twice = asyncio.run(scenario())
    assert once.returncode == 0, once.stderr
    assert once.stdout.count("shadowctl top") == 1, once.stdout
    row = next(line for line in once.stdout.splitlines() if line.split()[:3] == ["p1", "web", "primary"])
    assert "read 3000" in row, row  # the row is the telemetry's, in full
    assert twice.returncode == 0 and twice.stdout.count("shadowctl top") == 2, twice.stdout


def test_top_on_a_terminal_honours_once(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, str]:
        port = free_port()
        c = await fleet_with_data(tmp_path, port)
        try:
            return await asyncio.to_thread(in_terminal, port, 200, "top", "--once")
        finally:
            await c.stop()

    code, out = asyncio.run(scenario())
    assert code == 0 and "read 3000" in out, out


def test_plan_is_never_cut_without_a_terminal_and_fits_one(tmp_path: Path) -> None:
    async def scenario() -> tuple[subprocess.CompletedProcess[str], tuple[int, str]]:
        port = free_port()
        c = await fleet_with_data(tmp_path, port)
        try:
            wide = await asyncio.to_thread(piped, port, "plan")
            narrow = await asyncio.to_thread(in_terminal, port, 100, "plan")
        finally:
            await c.stop()
        return wide, narrow

    wide, (code, narrow) = asyncio.run(scenario())
    assert wide.returncode == 0, wide.stderr
    lines = wide.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["TIME", "SHADOW"])
    expected = "TIME SHADOW RES DEMAND FROM q0.5 q0.99 TARGET OLD NEW BRANCH RESULT"
    assert header.split() == expected.split(), header
    decision = next(line for line in lines if line.split()[-1:] == ["applied"])  # the recorded decision
    assert decision.split()[1:3] + decision.split()[-3:] == ["s1/web", "cpu", "remove", "[floor]", "applied"]
    assert len(header) > NARROW and "…" not in wide.stdout, wide.stdout
    # On a terminal the tables fit its width.
    assert code == 0, narrow
    assert "s1/web" in narrow and max(len(line) for line in narrow.splitlines()) <= 100, narrow
