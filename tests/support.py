"""Test helpers: what a test needs (skip locally, fail under CI), throwaway workload cgroups, daemons."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentd.capture.bpf_capture import BpfCapture, unavailable_reason
from agentd.capture.collector import Collector
from agentd.cgroupfs import CgroupLayout
from agentd.config import WorkloadConfig
from controller.config import ControllerConfig, HostEntry, ScalingConfig, ServiceConfig, StoreConfig
from shadowplane.tls import TlsConfig

ROOT = Path(__file__).resolve().parent.parent
PLAINTEXT = "[tls]\nplaintext = true\n"  # tests on loopback run without TLS, and say so in their configs


def in_ci() -> bool:
    """CI (`bash .ci/run`, as root with CI=true) has everything every test needs."""
    return os.environ.get("CI") == "true"


def need(available: object, missing: str, fix: str) -> None:
    """Go on when `available` is true. Otherwise the test cannot run here: it skips on a development
    machine, and fails under CI=true, where a skip would hide a CI host that lacks something. `missing`
    says what is missing, `fix` how to get it."""
    if available:
        return
    message = f"{missing}: {fix}"
    if in_ci():
        pytest.fail(f"CI=true and this test cannot run: {message}", pytrace=False)
    pytest.skip(message)


def need_root() -> None:
    need(
        os.geteuid() == 0,
        "needs root (cgroups, BPF, network namespaces)",
        "run the tests as root (sudo .venv/bin/python -m pytest ...); CI runs as root",
    )


def need_bpf() -> None:
    need_root()
    reason = unavailable_reason()  # names what is missing and how to get it
    need(reason is None, "BPF capture unavailable", str(reason))


def remove_leftover_lab() -> None:
    """A lab left by an earlier run (its namespaces or state file) is removed, as `python -m lab down`
    would, so the test can build its own; prints what it removed."""
    from lab import topology
    from lab.runner import STATE_FILE, down_all

    if topology.list_namespaces() or STATE_FILE.exists():
        removed = down_all()
        print("removed a leftover lab: " + ("; ".join(removed) or "nothing left to remove"))


class Workload:
    """A cgroup made for one test, in every hierarchy; commands run inside it."""

    def __init__(self, layout: CgroupLayout, path: str) -> None:
        self.layout, self.path = layout, path

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.layout.dirs(self.path)]

    def run(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        files = self.procs_files()

        def enter() -> None:
            for f in files:
                f.write_text(str(os.getpid()))

        return subprocess.run(argv, preexec_fn=enter, check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        files = self.procs_files()

        def enter() -> None:
            for f in files:
                f.write_text(str(os.getpid()))

        return subprocess.Popen(argv, preexec_fn=enter, **kw)  # type: ignore[call-overload, no-any-return]

    def kill_all(self) -> None:
        for d in self.layout.dirs(self.path):
            procs = d / "cgroup.procs"
            if procs.exists():
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)


def python() -> str:
    return sys.executable


class Daemon:
    """A Shadowplane daemon run as its own process, as an operator would run it."""

    def __init__(self, module: str, config: Path, log: Path) -> None:
        self.module, self.config, self.log = module, config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        from lab.procs import python_module, spawn

        self.proc = spawn(python_module(self.module, "run", "--config", str(self.config)), self.log)
        return self

    def stop(self) -> None:
        from lab.procs import stop

        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def veth_namespace(tag: str, iface: str = "eth0", peer: str = "eth1", address: str = "") -> Iterator[str]:
    """A network namespace of the test's own with lo and a veth pair (`iface`, `peer`) up inside it (this
    kernel has no dummy module), `address` on `iface` if given. Deleted afterwards, also on failure."""
    need_root()
    ns = f"sptest-{tag}-{uuid.uuid4().hex[:6]}"
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", peer],
            *(["ip", "-n", ns, "link", "set", link, "up"] for link in ("lo", iface, peer)),
            *([["ip", "-n", ns, "addr", "add", address, "dev", iface]] if address else []),
        ):
            subprocess.run(argv, check=True, capture_output=True, text=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def fleet_api_config(tmp_path: Path, port: int) -> ControllerConfig:
    """A plaintext controller on loopback with one service, web (primary p1, shadow s1), whose scaling cycle
    never runs during a test: what the Fleet API then shows is what the test put there."""
    return ControllerConfig(
        listen=f"127.0.0.1:{port}",
        tls=TlsConfig(plaintext=True),
        store=StoreConfig(path=tmp_path / "c.db"),
        scaling=ScalingConfig(interval_seconds=3600),
        host=[HostEntry("p1", address="127.0.0.1"), HostEntry("s1", address="127.0.0.1")],
        service=[ServiceConfig("web", "p1", ["s1"], vip="10.0.0.100/24")],
    )


def collector_for(capture: BpfCapture, w: Workload) -> Collector:
    """A collector of one workload "t" in `w`'s cgroup, sampling through `capture`."""
    wl = WorkloadConfig(name="t", cgroup=w.path, role="primary", service="t")
    return Collector(w.layout, [wl], capture)
