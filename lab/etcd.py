"""A real etcd cluster for the lab and the tests: N members of Debian's `etcd-server` on loopback (or in the
lab's namespaces), with mutual TLS between members and for clients, certificates from the project's own CA
(`shadowplane.pki`). Faults are process signals: kill -9, SIGSTOP (a member that hangs), restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller.cluster.dcs import DcsUnavailable, increment
from controller.cluster.etcd import EtcdDcs, EtcdTls
from lab.procs import free_port, spawn, stop, wait_for_port
from shadowplane import pki

ETCD = "etcd"


class EtcdError(RuntimeError):
    pass


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    scheme: str = "https"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"


@dataclass(frozen=True)
class MemberTls:
    ca: str
    cert: str  # the member's own (serving clients and peers), its address as a SAN
    key: str


def member_argv(m: Member, members: list[Member], token: str, tls: MemberTls | None) -> list[str]:
    """etcd's command line for member `m` of `members`. The same line restarts it: with its data directory
    in place, etcd ignores the initial-cluster flags and rejoins."""
    initial = ",".join(f"{x.name}={x.peer_url}" for x in members)
    argv = [
        ETCD,
        "--name", m.name,
        "--data-dir", str(m.data_dir),
        "--listen-client-urls", m.client_url,
        "--advertise-client-urls", m.client_url,
        "--listen-peer-urls", m.peer_url,
        "--initial-advertise-peer-urls", m.peer_url,
        "--initial-cluster", initial,
        "--initial-cluster-token", token,
        "--initial-cluster-state", "new" if not m.data_dir.exists() else "existing",
        # events and records are small and few: one hour of history before compaction
        "--auto-compaction-retention", "1",
        # a member cut off and back must not force an election on its return (etcd 3.4's default is off)
        "--pre-vote",
        "--logger", "zap", "--log-level", "warn",
    ]  # fmt: skip
    if tls is not None:
        argv += [
            "--cert-file", tls.cert, "--key-file", tls.key, "--trusted-ca-file", tls.ca, "--client-cert-auth",
            "--peer-cert-file", tls.cert, "--peer-key-file", tls.key, "--peer-trusted-ca-file", tls.ca,
            "--peer-client-cert-auth",
        ]  # fmt: skip
    return argv


@dataclass
class EtcdCluster:
    workdir: Path
    members: list[Member]
    tls: EtcdTls
    netns: dict[str, str] = field(default_factory=dict)  # member name -> namespace (the lab)

    @staticmethod
    def start(
        workdir: Path, size: int = 3, hosts: list[str] | None = None, timeout: float = 30.0
    ) -> EtcdCluster:
        """Certificates, then `size` members, and wait until the cluster takes a write."""
        if shutil.which(ETCD) is None:
            raise EtcdError("etcd is not installed: apt-get install etcd-server (make setup installs it)")
        workdir.mkdir(parents=True, exist_ok=True)
        pki_dir = workdir / "pki"
        pki_dir.mkdir(exist_ok=True)
        if not (pki_dir / "ca.pem").exists():
            pki.init_ca(pki_dir, "Shadowplane lab etcd CA")
        addresses = hosts or ["127.0.0.1"] * size
        members = [
            Member(f"etcd-{i + 1}", addresses[i], free_port(), free_port(), workdir / f"etcd-{i + 1}")
            for i in range(size)
        ]
        for m in members:
            pki.issue(pki_dir, m.name, "controller", sans=(m.host,))
        client = pki.issue(pki_dir, "etcd-client", "controller")
        tls = EtcdTls(str(pki_dir / "ca.pem"), str(client.cert), str(client.key))
        cluster = EtcdCluster(workdir, members, tls)
        try:
            for m in members:
                cluster._spawn(m, new=True)
            cluster.wait_ready(timeout)
        except BaseException:
            cluster.down()
            raise
        return cluster

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def _spawn(self, m: Member, new: bool) -> None:
        pki_dir = self.workdir / "pki"
        cert, key = str(pki_dir / f"controller-{m.name}.pem"), str(pki_dir / f"controller-{m.name}.key")
        tls = MemberTls(str(pki_dir / "ca.pem"), cert, key)
        argv = member_argv(m, self.members, f"shadowplane-{self.workdir.name}", tls)
        m.proc = spawn(argv, self.workdir / f"{m.name}.log", self.netns.get(m.name))

    def dcs(self, timeout: float = 1.0) -> EtcdDcs:
        return EtcdDcs(self.endpoints, self.tls, timeout)

    def wait_ready(self, timeout: float) -> None:
        for m in self.members:
            if m.proc is not None and self.netns.get(m.name) is None:
                wait_for_port(m.host, m.client_port, timeout, m.proc)
        dcs, deadline, last = self.dcs(), time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                increment(dcs, "/lab/ready")
                return
            except DcsUnavailable as e:
                last = str(e)
            time.sleep(0.1)
        logs = "\n".join((self.workdir / f"{m.name}.log").read_text()[-1500:] for m in self.members)
        raise EtcdError(f"etcd did not take a write in {timeout:g} s: {last}\n{logs}")

    # ---- faults ----

    def kill(self, name: str) -> None:
        """kill -9 of one member."""
        m = self.member(name)
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(5)

    def pause(self, name: str) -> None:
        m = self.member(name)
        if m.proc is not None:
            os.killpg(m.proc.pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        m = self.member(name)
        if m.proc is not None:
            os.killpg(m.proc.pid, signal.SIGCONT)

    def restart(self, name: str) -> None:
        """Start a member that was killed or stopped again, with its data."""
        m = self.member(name)
        if m.proc is not None and m.proc.poll() is None:
            stop(m.proc)
        self._spawn(m, new=False)

    def down(self) -> None:
        for m in self.members:
            if m.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.proc.pid, signal.SIGCONT)
                stop(m.proc)
