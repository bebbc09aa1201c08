"""The `Lab`: bring a lab up, watch it, break it, tear it down.

    with Lab.up(Spec(primaries=1, shadows=2)) as lab:
        lab.cut_link("p1")
        ...

Everything the lab starts is recorded in a state file (/run/shadowplane-lab/state.json) as soon as it
exists, so `down` works from another process and after a crash; without a state file it still finds what a
lab leaves (namespaces named splab-*, their processes, the /splab cgroups, work directories under
/run/shadowplane-lab) and removes it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import psutil

from agentd.cgroupfs import CgroupError, CgroupLayout
from controller.cluster.shards import shard_of
from lab import configs, topology
from lab.etcd import Member, MemberTls, member_argv
from lab.poller import Poller
from lab.procs import child_env, python_module, spawn
from lab.spec import (
    CGROUP_ROOT,
    CONTROLLER_PORT,
    DNS_ZONE,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    PREFIX,
    SWITCH_NS,
    HostPlan,
    Plan,
    ServicePlan,
    Spec,
    SpecError,
    plan,
)
from lab.vipcheck import VipChecker, holders, normalize, read_all
from shadowctl.fleet_view import host_row
from shadowplane import pki
from shadowplane.pki import ROLE_SAN
from shadowplane.tls import TlsConfig, channel_credentials
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc

STATE_DIR = Path("/run/shadowplane-lab")
STATE_FILE = STATE_DIR / "state.json"
STOP_GRACE_SECONDS = 3.0
IPTABLES = ("iptables-legacy", "ip6tables-legacy")  # tables in the lab's namespaces only
DELAY_QUEUE = 7  # the NFQUEUE number of a host's delay line (one per namespace)


class LabError(RuntimeError):
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "the lab needs root (network namespaces, veth pairs, cgroups): run it as root or with sudo"
        )


@dataclass
class ProcRecord:
    name: str  # e.g. "controller", "agent-p1", "httpd-s1"
    host: str
    pid: int
    started: float  # the process's start time: a pid reused by another process does not match
    log: str
    argv: list[str]


@dataclass
class State:
    workdir: str
    owned_workdir: bool  # made by the lab (removed on down) rather than given by the caller
    spec: dict[str, Any]
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    processes: list[ProcRecord] = field(default_factory=list)
    tsig_secret: str = ""
    created_unix: float = field(default_factory=time.time)

    def save(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> State:
        d = json.loads(path.read_text())
        d["processes"] = [ProcRecord(**p) for p in d.get("processes", [])]
        return cls(**d)


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_process(rec: ProcRecord) -> bool:
    """The recorded process is still running (not a zombie), and is the one recorded, not a reused pid."""
    try:
        p = psutil.Process(rec.pid)
        return abs(p.create_time() - rec.started) < 0.5 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Lab:
    def __init__(self, lab_plan: Plan, state: State) -> None:
        self.plan = lab_plan
        self.state = state
        self.workdir = Path(state.workdir)
        self._popens: dict[str, subprocess.Popen[bytes]] = {}
        self._bind_procs: dict[str, Any] = {}
        self._forwarders: dict[str, topology.Forwarder] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._is_down = False
        self._extra = 0

    # ---- lifecycle ----

    @classmethod
    def up(cls, spec: Spec | None = None, wait: bool = True) -> Lab:
        """Build the lab and start every process; with `wait`, return once the web servers answer and every
        agent is connected to the controller. On any failure everything made so far is removed."""
        spec = spec or Spec()
        require_root()
        try:
            lab_plan = plan(spec)
        except SpecError as e:
            raise LabError(f"bad lab spec: {e}") from None
        if spec.dns and importlib.util.find_spec("lab.bind") is None:
            raise LabError("DNS lab host needs lab/bind.py, which is not there yet")
        existing = topology.list_namespaces()
        if existing:
            raise LabError(
                f"a lab is already up (namespaces {', '.join(existing)}); run `python -m lab down` first"
            )
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        try:
            # claiming the state file with O_EXCL: of two `lab up` at once, one wins
            os.close(os.open(STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise LabError(
                f"a lab is already up (state file {STATE_FILE}); run `python -m lab down` first"
            ) from None
        try:
            if spec.workdir is not None:
                spec.workdir.mkdir(parents=True, exist_ok=True)
                workdir = spec.workdir
            else:
                workdir = Path(tempfile.mkdtemp(prefix="lab-", dir=STATE_DIR))
        except BaseException:
            STATE_FILE.unlink(missing_ok=True)
            raise
        state = State(str(workdir), spec.workdir is None, spec.to_dict())
        state.tsig_secret = base64.b64encode(secrets.token_bytes(32)).decode()
        lab = cls(lab_plan, state)
        lab._save()
        try:
            lab._build(wait)
        except BaseException as e:
            details = lab._failure_details()
            lab.down()
            if isinstance(e, LabError | topology.TopologyError | OSError | CgroupError):
                raise LabError(f"lab up failed: {e}{details}") from e
            raise
        return lab

    @classmethod
    def attach(cls) -> Lab:
        """The lab that is up, from its state file (for `lab status` and `lab down` in another process)."""
        require_root()
        if not STATE_FILE.exists():
            raise LabError(f"no lab is up (no {STATE_FILE}); start one with `python -m lab up`")
        try:
            state = State.load()
            return cls(plan(Spec.from_dict(state.spec)), state)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise LabError(
                f"unreadable state file {STATE_FILE} ({e}); `python -m lab down` removes the lab"
            ) from e

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, Exception) and not self._is_down:
            # the logs go with the lab: keep their ends with the error that ended it
            for r in self.state.processes:
                if r.log:
                    exc.add_note(f"--- last lines of {r.name} ({r.log}):\n{_tail(Path(r.log), 10)}")
        self.down()

    def _save(self) -> None:
        self.state.save()

    def _build(self, wait: bool) -> None:
        spec, p = self.plan.spec, self.plan
        for sub in ("logs", "hooks", "mnt"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.state.namespaces = []
        try:
            topology.build(p, self.state.namespaces)
        finally:
            self._save()
        layout = CgroupLayout.detect()
        self.state.cgroups = [CGROUP_ROOT]
        self._save()
        for h in p.fleet_hosts():
            for s, _ in p.workloads(h.name):
                layout.ensure(s.cgroup(h.name))
            configs.hooks_dir(self.workdir, h.name).mkdir(parents=True, exist_ok=True)
        for h in p.fleet_hosts():
            # one web server per host, in its first workload's cgroup (a shadow of several services serves
            # them all from one process on one port)
            first = p.workloads(h.name)[0][0]
            self._spawn(
                f"httpd-{h.name}",
                h,
                python_module("lab.httpd", "--name", h.name, "--port", str(spec.http_port)),
                cgroup=first.cgroup(h.name),
            )
        if spec.failover == "shadowplane":
            if not spec.plaintext:
                configs.issue_certificates(p, self.workdir)
            self._start_controller_and_agents()
        if spec.dns:
            self._start_dns()
        self._wait_web_servers(spec.startup_timeout_seconds)
        if wait and spec.failover == "shadowplane":
            self.wait_agents_connected(spec.startup_timeout_seconds)

    def _start_controller_and_agents(self) -> None:
        p = self.plan
        etcd = self._start_etcd() if p.spec.controllers > 1 else []
        for h in p.controller_hosts():
            name = configs.controller_process(h.name)
            ctl_toml = self.workdir / f"{name}.toml"
            ctl_toml.write_text(
                configs.controller_toml(p, self.workdir, self.state.tsig_secret, h.name, etcd)
            )
            ctl = self._spawn(name, h, python_module("controller.cli", "run", "--config", str(ctl_toml)))
            self._wait(
                functools.partial(topology.port_open, h.namespace, h.ipv4, CONTROLLER_PORT),
                self.plan.spec.startup_timeout_seconds,
                f"{name} listening on {h.ipv4}:{CONTROLLER_PORT}",
                [ctl],
            )
        for h in p.fleet_hosts():
            cfg = self.workdir / f"agentd-{h.name}.toml"
            cfg.write_text(configs.agent_toml(p, h.name, self.workdir))
            self._spawn(
                f"agent-{h.name}",
                h,
                python_module("agentd.cli", "run", "--config", str(cfg)),
                with_cgroups=True,
            )

    def etcd_members(self) -> list[Member]:
        """One etcd member in each controller namespace (`lab up --controllers N`)."""
        tls = "http" if self.plan.spec.plaintext else "https"
        return [
            Member(
                f"etcd-{h.name}",
                h.ipv4,
                ETCD_CLIENT_PORT,
                ETCD_PEER_PORT,
                self.workdir / "etcd" / h.name,
                scheme=tls,
            )
            for h in self.plan.controller_hosts()
        ]

    def _start_etcd(self) -> list[str]:
        """Start the members as lab processes ("etcd-ctl", "etcd-ctl2", ...: kill, stop and restart them like
        any other) with certificates from the lab's CA; the replicas reach them with their own."""
        members = self.etcd_members()
        (self.workdir / "etcd").mkdir(exist_ok=True)
        tls_dir = configs.tls_dir(self.workdir)
        placed = list(zip(self.plan.controller_hosts(), members, strict=True))
        for host, m in placed:
            member_tls = None
            if not self.plan.spec.plaintext:
                creds = pki.issue(tls_dir, m.name, "controller", sans=(m.host,), days=30)
                member_tls = MemberTls(str(tls_dir / "ca.pem"), str(creds.cert), str(creds.key))
            argv = member_argv(m, members, f"splab-{self.workdir.name}", member_tls)
            self._spawn(m.name, host, argv)
        for h, m in placed:
            self._wait(
                functools.partial(topology.port_open, h.namespace, h.ipv4, ETCD_CLIENT_PORT),
                self.plan.spec.startup_timeout_seconds,
                f"{m.name} listening on {h.ipv4}:{ETCD_CLIENT_PORT}",
                [self._proc(m.name)],
            )
        return [m.client_url for m in members]

    def _start_dns(self) -> None:
        bind = importlib.import_module("lab.bind")
        h = self.plan.host("dns")
        records = {s.name: s.vip_ip for s in self.plan.services}
        proc = bind.start_bind(
            self.workdir / "dns",
            h.namespace,
            h.ipv4,
            53,
            DNS_ZONE,
            records,
            configs.TSIG_NAME,
            self.state.tsig_secret,
        )
        self._bind_procs["named"] = proc
        self._record("named", h, proc, self.workdir / "dns" / "named.log", list(getattr(proc, "args", [])))

    def _spawn(
        self,
        name: str,
        host: HostPlan,
        argv: Sequence[str],
        cgroup: str | None = None,
        with_cgroups: bool = False,
    ) -> ProcRecord:
        log = self.workdir / "logs" / f"{name}.log"
        prefix = (
            topology.netns_exec_with_cgroups(host.namespace, self.workdir / "mnt")
            if with_cgroups
            else topology.netns_exec(host.namespace)
        )
        procs_files = [d / "cgroup.procs" for d in CgroupLayout.detect().dirs(cgroup)] if cgroup else []
        proc = spawn([*prefix, *argv], log, cgroup_procs=procs_files)
        return self._record(name, host, proc, log, list(argv))

    def _record(
        self, name: str, host: HostPlan, proc: subprocess.Popen[bytes], log: Path, argv: list[str]
    ) -> ProcRecord:
        self._popens[name] = proc
        rec = ProcRecord(name, host.name, proc.pid, _start_time(proc.pid) or time.time(), str(log), argv)
        self.state.processes = [r for r in self.state.processes if r.name != name] + [rec]
        self._save()
        return rec

    def _wait(
        self, pred: Callable[[], bool], timeout: float, what: str, watch: Sequence[ProcRecord] = ()
    ) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            for rec in watch:
                if not self.alive(rec.name):
                    raise LabError(
                        f"{rec.name} exited while waiting for {what}; its log:\n{_tail(Path(rec.log))}"
                    )
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)

    def _wait_web_servers(self, timeout: float) -> None:
        client = self.plan.host("client").namespace
        port = self.plan.spec.http_port
        for h in self.plan.fleet_hosts():
            rec = self._proc(f"httpd-{h.name}")
            self._wait(
                functools.partial(topology.port_open, client, h.ipv4, port),
                timeout,
                f"the web server on {h.name} ({h.ipv4}:{port})",
                [rec],
            )

    def _failure_details(self) -> str:
        dead = [r for r in self.state.processes if not self.alive(r.name)]
        return "".join(f"\n--- {r.name} exited; last lines of {r.log}:\n{_tail(Path(r.log))}" for r in dead)

    def down(self, keep_workdir: bool = False) -> list[str]:
        """Stop every process, remove the cgroups, namespaces, work directory and state file. Idempotent;
        returns what it removed."""
        if self._is_down:
            return []
        self._close_grpc()
        removed = _stop_processes(self.state.processes, self._popens, self._bind_procs)
        removed += _sweep(self.state.namespaces)
        workdir = Path(self.state.workdir)
        if self.state.owned_workdir and not keep_workdir and workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(f"work directory {workdir}")
        with contextlib.suppress(FileNotFoundError):
            STATE_FILE.unlink()
            removed.append(f"state file {STATE_FILE}")
        self._is_down = True
        return removed

    # ---- looking at it ----

    def host(self, name: str) -> HostPlan:
        return self.plan.host(name)

    def service(self, name: str | None = None) -> ServicePlan:
        return self.plan.services[0] if name is None else self.plan.service(name)

    def hooks_dir(self, host: str) -> Path:
        return configs.hooks_dir(self.workdir, self.plan.host(host).name)

    def install_hook(self, host: str, phase: str, script: str, service: str | None = None) -> Path:
        """Write an executable transition hook (`<hooks_dir>/<service>/<phase>`) on a host."""
        path = self.hooks_dir(host) / self.service(service).name / phase
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        return path

    def _proc(self, name: str) -> ProcRecord:
        for r in self.state.processes:
            if r.name == name:
                return r
        raise KeyError(
            f"no lab process {name!r}; processes: {', '.join(r.name for r in self.state.processes)}"
        )

    def alive(self, name: str) -> bool:
        rec = self._proc(name)
        proc = self._popens.get(name)
        if proc is not None:
            return proc.poll() is None
        return _same_process(rec)

    def logs(self, process: str) -> str:
        """A process's log: "controller", "agent-p1", "httpd-s1", "named", or a `popen_in` name."""
        p = Path(self._proc(process).log)
        return p.read_text(errors="replace") if p.is_file() else ""

    def addresses(self) -> dict[str, set[str]]:
        """Every lab host's addresses, as its namespace holds them now."""
        return read_all({h.name: h.namespace for h in self.plan.hosts})

    def vip_holders(self, service: str | None = None) -> list[str]:
        return holders(self.addresses(), normalize(self.service(service).vip_ip))

    def wait_owner(self, service: str | None, host: str | None, timeout: float) -> str:
        """Wait until exactly one host holds the VIP (`host`, if given); return it."""
        deadline = time.monotonic() + timeout
        while True:
            hs = self.vip_holders(service)
            if len(hs) == 1 and (host is None or hs[0] == host):
                return hs[0]
            if time.monotonic() > deadline:
                want = host or "exactly one host"
                raise LabError(
                    f"timed out after {timeout:.0f}s waiting for {want} to hold the VIP; holders: {hs}"
                )
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        addrs = self.addresses()
        views, ctl_error = self._controller_views()
        hosts = []
        for h in self.plan.hosts:
            procs = {r.name.split("-")[0]: r.pid for r in self.state.processes if r.host == h.name}
            alive = all(self.alive(r.name) for r in self.state.processes if r.host == h.name)
            hosts.append(
                {
                    "name": h.name,
                    "namespace": h.namespace,
                    "role": h.role,
                    "addresses": h.addresses,
                    "bridge_port": h.bridge_port,
                    "zone": h.zone,
                    "processes": procs,
                    "alive": alive and h.name in addrs,
                }
            )
        services = []
        for s in self.plan.services:
            owners = holders(addrs, normalize(s.vip_ip))
            services.append(
                {
                    "name": s.name,
                    "vip": s.vip,
                    "primary": s.primary,
                    "shadows": list(s.shadows),
                    "owner": owners[0] if len(owners) == 1 else None,
                    "owners": owners,
                    "controller_view": views.get(s.name) if views is not None else None,
                }
            )
        return {
            "controller": self.plan.controller_address,
            "workdir": str(self.workdir),
            "switch_namespace": SWITCH_NS,
            "hosts": hosts,
            "services": services,
            "controller_error": ctl_error,
        }

    # ---- the controller, over a loopback door into the controller's namespace ----

    def fleet(self, host: str = "ctl") -> fgrpc.FleetStub:
        """A Fleet API stub for the lab's controller (or replica `host`), usable from this process."""
        if host not in self._channels:
            h = self.plan.host(host)
            fwd = self._forwarders[host] = topology.Forwarder(h.namespace, (h.ipv4, CONTROLLER_PORT))
            # no proxy: the environment's http_proxy must not see a loopback address
            options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
            creds = channel_credentials(self.operator_tls())
            if creds is None:
                self._channels[host] = grpc.insecure_channel(fwd.address, options=options)
            else:
                # the controller's certificate names its role, not the loopback door's address
                options.append(("grpc.ssl_target_name_override", ROLE_SAN["controller"]))
                self._channels[host] = grpc.secure_channel(fwd.address, creds, options=options)
        return fgrpc.FleetStub(self._channels[host])

    def replica_states(self, timeout: float = 1.0) -> dict[str, str]:
        """Each controller replica's standing as it says it ("leader", "following ctl2", ...; "down: ..."
        when it does not answer)."""
        out = {}
        for h in self.plan.controller_hosts():
            try:
                resp = self.fleet(h.name).ListServices(fpb.ListServicesRequest(), timeout=timeout)
                out[h.name] = resp.controller.split(": ", 1)[-1]
            except grpc.RpcError as e:
                out[h.name] = f"down: {e.code().name if isinstance(e, grpc.Call) else e}"
        return out

    def leader(self, timeout: float = 15.0, service: str = "") -> str:
        """The replica that acts as leader, once exactly one says so; with shards, the one that acts for
        `service`'s shard (its state: "leader of 2 of 4 shards (0, 3)")."""
        deadline, states = time.monotonic() + timeout, {}
        shard = shard_of(service, self.plan.spec.shards)

        def leads(state: str) -> bool:
            if self.plan.spec.shards == 1:
                return state == "leader"
            m = re.fullmatch(r"leader of \d+ of \d+ shards \(([\d, ]+)\)", state)
            return m is not None and shard in {int(k) for k in m.group(1).split(", ")}

        while time.monotonic() < deadline:
            states = self.replica_states()
            leaders = [h for h, s in states.items() if leads(s)]
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.1)
        raise LabError(f"no single leader among the replicas after {timeout:g} s: {states}")

    def operator_tls(self) -> TlsConfig:
        """The lab's operator credentials (what `shadowctl --ca/--cert/--key` would take), or plaintext."""
        if self.plan.spec.plaintext:
            return TlsConfig(plaintext=True)
        c = configs.credentials(self.workdir, "operator", configs.OPERATOR_CERT_NAME)
        return TlsConfig(ca=c.ca, cert=c.cert, key=c.key)

    def _close_grpc(self) -> None:
        for ch in self._channels.values():
            ch.close()
        for fwd in self._forwarders.values():
            fwd.close()
        self._channels, self._forwarders = {}, {}

    def list_hosts(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        return [host_row(h) for h in self.fleet().ListHosts(fpb.ListHostsRequest(), timeout=timeout).hosts]

    def _controller_views(self) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
        if self.plan.spec.failover != "shadowplane":
            return None, "no controller in this lab (failover = none)"
        try:
            resp = self.fleet().ListServices(fpb.ListServicesRequest(), timeout=2.0)
        except grpc.RpcError as e:
            code = e.code().name if isinstance(e, grpc.Call) else "error"
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            return None, f"ListServices: {code}: {details}"
        return {
            s.name: {"owner": s.owner or None, "token": s.token, "phase": s.phase} for s in resp.services
        }, None

    def wait_agents_connected(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the controller lists every primary and shadow as connected and healthy."""
        want = {h.name for h in self.plan.fleet_hosts()}
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        last_error = ""
        while True:
            for name in ["controller", *(f"agent-{h}" for h in sorted(want))]:
                if not self.alive(name):
                    raise LabError(f"{name} exited; its log:\n{_tail(Path(self._proc(name).log))}")
            try:
                rows = self.list_hosts(timeout=1.0)
                last_error = ""
            except grpc.RpcError as e:
                last_error = str(e.code()) if isinstance(e, grpc.Call) else str(e)
            ready = {r["host"] for r in rows if r["connected"] and r["health"] == "healthy"}
            if want <= ready:
                return rows
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(want - ready))
                raise LabError(
                    f"timed out after {timeout:.0f}s waiting for agents to connect;"
                    f" not connected and healthy: {missing}{' (' + last_error + ')' if last_error else ''}"
                )
            time.sleep(0.1)

    # ---- running things in hosts ----

    def _prefix(self, host: str) -> list[str]:
        return topology.netns_exec(self.plan.host(host).namespace)

    def run_in(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside a host's namespace and wait for it (subprocess.run keywords). It can import
        the lab (`child_env`), also with an `env` of the caller's."""
        kw["env"] = child_env(kw.get("env"))
        return subprocess.run([*self._prefix(host), *argv], **kw)

    def popen_in(
        self, host: str, argv: Sequence[str], name: str | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start a command inside a host's namespace (subprocess.Popen keywords). The lab records it and
        stops it (its whole process group) on `down`, if the caller has not. It can import the lab
        (`child_env`), also with an `env` of the caller's."""
        h = self.plan.host(host)
        if name is None:
            self._extra += 1
            name = f"extra{self._extra}-{h.name}"
        kw.setdefault("start_new_session", True)
        kw["env"] = child_env(kw.get("env"))
        proc: subprocess.Popen[Any] = subprocess.Popen([*self._prefix(host), *argv], **kw)
        self._popens[name] = proc
        rec = ProcRecord(name, h.name, proc.pid, _start_time(proc.pid) or time.time(), "", list(argv))
        self.state.processes.append(rec)
        self._save()
        return proc

    def http_get(
        self, from_host: str, address: str, port: int | None = None, timeout: float = 1.0
    ) -> tuple[int, str]:
        """An HTTP GET made from inside a host's namespace: (status, body)."""
        ns = self.plan.host(from_host).namespace
        return topology.http_get(ns, address, port or self.plan.spec.http_port, timeout)

    def vip_url(self, service: str | None = None) -> str:
        vip = self.service(service).vip_ip
        return f"http://{f'[{vip}]' if ':' in vip else vip}:{self.plan.spec.http_port}/"

    def poller(self, service: str | None = None, interval: float = 0.01, timeout: float = 0.2) -> Poller:
        """A client poller for a service's VIP, its sockets in the client namespace (not started)."""
        return Poller(self.vip_url(service), interval, timeout, netns=self.plan.host("client").namespace)

    def vipcheck(self, interval: float = 0.01) -> VipChecker:
        """A split-brain checker over every lab host and every VIP (not started)."""
        return VipChecker(
            {h.name: h.namespace for h in self.plan.hosts}, [s.vip_ip for s in self.plan.services], interval
        )

    # ---- faults ----

    def pid(self, name: str) -> int:
        return self._proc(name).pid

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to one lab process (only it, not its group): SIGSTOP/SIGCONT/SIGKILL faults. A killed
        process is reaped here, so `alive` is false at once."""
        os.kill(self._proc(name).pid, sig)
        proc = self._popens.get(name)
        if sig == signal.SIGKILL and proc is not None:
            proc.wait(10)

    def restart(self, name: str) -> None:
        """Start a lab daemon ("controller", "agent-p1", "httpd-p1") again after a fault ended it: the same
        command in the same namespace (and cgroup), logging to the same file."""
        if self.alive(name):
            raise LabError(f"{name} is running: stop it before restarting it")
        rec = self._proc(name)
        host = self.plan.host(rec.host)
        kind = name.split("-")[0]
        cgroup = self.plan.workloads(host.name)[0][0].cgroup(host.name) if kind == "httpd" else None
        self._spawn(name, host, rec.argv, cgroup=cgroup, with_cgroups=kind == "agent")

    def spawn_load(self, host: str, argv: Sequence[str], name: str) -> None:
        """Run a load generator (e.g. stress-ng) in `host`'s namespace and in its first workload's cgroup,
        as the host's own service would run; stopped with the lab, or by `stop_process`."""
        h = self.plan.host(host)
        self._spawn(name, h, argv, cgroup=self.plan.workloads(h.name)[0][0].cgroup(h.name))

    # This kernel has no sch_netem (and nftables has no `queue`), so loss and delay are iptables rules in
    # the host's namespace on its outgoing packets, where netem would sit: `statistic --mode random` drops,
    # and NFQUEUE hands packets to a userspace delay line (lab/delayline.py).

    def _iptables(self, host: str, *rule: str) -> None:
        for tool in IPTABLES:
            r = self.run_in(host, [tool, "-w", *rule], capture_output=True, text=True)
            if r.returncode != 0:
                raise LabError(f"{tool} {' '.join(rule)} in {host}: {r.stderr.strip()}")

    def add_loss(self, host: str, fraction: float) -> None:
        """Drop `fraction` of the packets `host` sends, at random (netem's `loss`)."""
        self._iptables(
            host,
            *("-A", "OUTPUT", "-o", "eth0", "-m", "statistic", "--mode", "random"),
            *("--probability", f"{fraction:.4f}", "-j", "DROP"),
        )

    def add_delay(self, host: str, seconds: float) -> None:
        """Hold every packet `host` sends for `seconds` (netem's `delay`), in a delay line process."""
        name = f"delayline-{host}"
        self._spawn(
            name,
            self.plan.host(host),
            python_module("lab.delayline", "--queue", str(DELAY_QUEUE), "--delay", str(seconds)),
        )
        self._wait(
            lambda: "delay line on" in self.logs(name), 10, f"the delay line in {host}", [self._proc(name)]
        )
        self._iptables(
            host,
            "-A",
            "OUTPUT",
            "-o",
            "eth0",
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(DELAY_QUEUE),
            "--queue-bypass",
        )

    def clear_impairments(self, host: str) -> None:
        """Remove the loss and delay rules from `host` and stop its delay line."""
        self._iptables(host, "-F", "OUTPUT")
        if any(r.name == f"delayline-{host}" for r in self.state.processes):
            self.stop_process(f"delayline-{host}")

    def stop_process(self, name: str) -> None:
        """SIGTERM a process the lab started (its group), SIGKILL after the grace period."""
        popens = {name: self._popens[name]} if name in self._popens else {}
        _stop_processes([r for r in self.state.processes if r.name == name], popens, {})

    def cut_link(self, host: str) -> None:
        """Take the host's port on the bridge down: its eth0 loses carrier, nothing gets in or out."""
        topology.set_port(self.plan, host, up=False)

    def restore_link(self, host: str) -> None:
        topology.set_port(self.plan, host, up=True)

    def partition(self, a: str, b: str) -> None:
        """Drop all traffic between two hosts (blackhole routes both ways); others still reach both."""
        ha, hb = self.plan.host(a), self.plan.host(b)
        topology.blackhole(ha.namespace, [hb.ipv4, hb.ipv6], add=True)
        topology.blackhole(hb.namespace, [ha.ipv4, ha.ipv6], add=True)

    def heal(self, a: str, b: str) -> None:
        ha, hb = self.plan.host(a), self.plan.host(b)
        topology.blackhole(ha.namespace, [hb.ipv4, hb.ipv6], add=False)
        topology.blackhole(hb.namespace, [ha.ipv4, ha.ipv6], add=False)


# ---- teardown, with or without a state file ----


def _stop_processes(
    records: Sequence[ProcRecord], popens: dict[str, subprocess.Popen[bytes]], bind_procs: dict[str, Any]
) -> list[str]:
    """SIGTERM every recorded process group at once (daemons log their goodbyes), SIGKILL what is left
    after the grace period."""
    removed = []
    for proc in bind_procs.values():
        with contextlib.suppress(Exception):  # whatever it raises, the sweep below still kills named
            importlib.import_module("lab.bind").stop_bind(proc)
    live = [r for r in records if _same_process(r)]
    for r in live:
        _signal_group(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while any(_running(r, popens) for r in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for r in live:
        if _running(r, popens):
            _signal_group(r.pid, signal.SIGKILL)
        removed.append(f"process {r.name} (pid {r.pid})")
    for proc in popens.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    return removed


def _running(rec: ProcRecord, popens: dict[str, subprocess.Popen[bytes]]) -> bool:
    proc = popens.get(rec.name)
    if proc is not None and proc.pid == rec.pid:
        return proc.poll() is None  # also reaps it
    return _same_process(rec)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _kill_pids(pids: Sequence[int]) -> list[int]:
    me = os.getpid()
    killed = []
    for pid in pids:
        if pid in (me, 1):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 3.0
    while not all(_gone(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def _gone(pid: int) -> bool:
    """Exited, or a zombie: dead, though its parent (maybe not us) has yet to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _cgroup_pids(layout: CgroupLayout) -> list[int]:
    pids: set[int] = set()
    for d in layout.dirs(CGROUP_ROOT):
        if d.is_dir():
            for procs in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in procs.read_text().split())
    return sorted(pids)


def _sweep(known_namespaces: Sequence[str] = ()) -> list[str]:
    """Remove whatever a lab leaves, found by name: processes in splab-* namespaces and in /splab cgroups,
    the cgroups, the namespaces (their links go with them)."""
    removed: list[str] = []
    names = sorted(set(topology.list_namespaces()) | {n for n in known_namespaces if n.startswith(PREFIX)})
    for ns in names:
        killed = _kill_pids(topology.namespace_pids(ns))
        if killed:
            removed.append(f"{len(killed)} leftover process(es) in {ns}")
    try:
        layout: CgroupLayout | None = CgroupLayout.detect()
    except CgroupError:
        layout = None
    if layout is not None and any(d.is_dir() for d in layout.dirs(CGROUP_ROOT)):
        for _ in range(3):
            killed = _kill_pids(_cgroup_pids(layout))
            if not killed:
                break
            removed.append(f"{len(killed)} leftover process(es) in cgroup {CGROUP_ROOT}")
        for attempt in range(50):
            try:
                layout.remove(CGROUP_ROOT)
                removed.append(f"cgroup {CGROUP_ROOT}")
                break
            except OSError:
                # a killed task leaves its cgroup a moment after it is reaped
                if attempt == 49:
                    raise
                time.sleep(0.1)
    for ns in names:
        if topology.delete_namespace(ns):
            removed.append(f"namespace {ns}")
    return removed


def down_all(keep_workdir: bool = False) -> list[str]:
    """`lab down`: from the state file when there is one, then by name for anything left."""
    require_root()
    removed: list[str] = []
    if STATE_FILE.exists():
        try:
            lab = Lab.attach()
        except LabError as e:
            removed.append(f"unreadable state file {STATE_FILE} ({e.__cause__ or e})")
            STATE_FILE.unlink(missing_ok=True)
        else:
            removed += lab.down(keep_workdir)
    removed += _sweep()
    if STATE_DIR.is_dir() and not keep_workdir:
        for d in sorted(STATE_DIR.glob("lab-*")):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"work directory {d}")
    return removed
