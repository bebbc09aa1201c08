"""Network namespaces, the bridge and the veth pairs; sockets opened inside a namespace.

Everything the lab creates lives in namespaces named `splab-*`, the bridge included: every `ip` command here
carries `-n NAMESPACE` (or runs under `ip netns exec`), so the root namespace's links, addresses, routes and
sysctls are never touched. Deleting the namespaces deletes every link in them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.spec import BRIDGE, PREFIX, SWITCH_NS, HostPlan, Plan

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# sysctls set inside every lab namespace: IPv6 addresses usable at once (no duplicate address detection)
NS_SYSCTLS = (
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
)


class TopologyError(RuntimeError):
    pass


def ip(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if check and r.returncode != 0:
        cmd = " ".join(["ip", *args])
        raise TopologyError(f"`{cmd}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def ip_in(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ip("-n", ns, *args, check=check)


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Several `ip` commands in one process, all inside `ns`; stops at the first failure."""
    if commands:
        ip("-n", ns, "-batch", "-", stdin="\n".join(commands) + "\n")


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    r = ip("netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(ns: str) -> list[int]:
    r = ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def netns_exec(ns: str) -> list[str]:
    """Prefix that runs a command inside `ns`, seeing that namespace's /sys (its interfaces)."""
    return ["ip", "netns", "exec", ns]


# `ip netns exec` remounts /sys for the namespace, which hides /sys/fs/cgroup (and tracefs, bpffs): agents
# need both the namespace's /sys/class/net and the host's cgroups. This keeps a private mount namespace with
# a fresh sysfs and binds the old sysfs' mounts back, touching no mount outside that private namespace.
_SYS_WITH_CGROUPS = r"""
set -e
old="$0"
mount --rbind /sys "$old"
mount -t sysfs "$SPLAB_NETNS" /sys
for d in fs/cgroup kernel/tracing kernel/debug fs/bpf; do
  if mountpoint -q "$old/$d"; then mount --rbind "$old/$d" "/sys/$d"; fi
done
umount -l "$old"
exec "$@"
"""


def netns_exec_with_cgroups(ns: str, scratch_dir: Path) -> list[str]:
    """Like `netns_exec`, but cgroups (and tracefs) stay visible. `scratch_dir` is an empty directory used
    as a mount point inside the private mount namespace only."""
    return [
        "env",
        f"SPLAB_NETNS={ns}",
        "nsenter",
        f"--net={NETNS_DIR / ns}",
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        _SYS_WITH_CGROUPS,
        str(scratch_dir),
    ]


# ---- sockets inside a namespace, from this process ----


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the calling thread (only it: setns(2) on a network namespace is per thread) inside `ns`.

    Sockets created inside stay in `ns` for their whole life, so one process can talk to every lab host.
    """
    try:
        target = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TopologyError(f"network namespace {ns} does not exist (is the lab up?)") from None
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(target)
        os.close(back)


def socket_in(ns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    if ns is None:
        return socket.socket(family, type, proto)
    with in_netns(ns):
        return socket.socket(family, type, proto)


def connect_in(ns: str | None, host: str, port: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket_in(ns, family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def http_get(ns: str | None, host: str, port: int, timeout: float = 1.0, path: str = "/") -> tuple[int, str]:
    """One HTTP/1.0 GET from inside `ns`: (status, body)."""
    with connect_in(ns, host, port, timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[1].isdigit():
        raise OSError(f"not an HTTP answer from {host}:{port}: {data[:80]!r}")
    return int(status[1]), body.decode(errors="replace")


def port_open(ns: str, host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        connect_in(ns, host, port, timeout).close()
        return True
    except OSError:
        return False


# ---- building and removing the topology ----


def host_commands(h: HostPlan) -> list[str]:
    """`ip -batch` lines run inside the host's namespace once its eth0 exists."""
    v4, v6 = h.addresses
    return [
        "link set lo up",
        f"addr add {v4} dev eth0",
        f"addr add {v6} dev eth0 nodad",
        "link set eth0 up",
    ]


def switch_commands(plan: Plan) -> list[str]:
    """`ip -batch` lines run inside the switch namespace: the bridge, and one veth pair per host whose
    other end is created directly in the host's namespace (never in the root namespace)."""
    # STP off and forward delay 0: a port forwards as soon as its link is up, so a restored link carries
    # traffic at once; no multicast snooping, so VRRP and neighbour discovery reach every port.
    cmds = [
        "link set lo up",
        f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
        f"link set {BRIDGE} up",
    ]
    for h in plan.hosts:
        cmds += [
            f"link add {h.bridge_port} type veth peer name eth0 netns {h.namespace}",
            f"link set {h.bridge_port} master {BRIDGE}",
            f"link set {h.bridge_port} up",
        ]
    return cmds


def namespaces(plan: Plan) -> list[str]:
    return [SWITCH_NS, *(h.namespace for h in plan.hosts)]


def create_namespace(ns: str) -> None:
    if not ns.startswith(PREFIX):
        raise TopologyError(f"lab namespaces start with {PREFIX!r}, not {ns!r}")
    ip("netns", "add", ns)
    subprocess.run(
        [*netns_exec(ns), "sysctl", "-q", "-w", *NS_SYSCTLS], check=True, capture_output=True, text=True
    )


def build(plan: Plan, created: list[str]) -> None:
    """Create every namespace, the bridge and the links. Each namespace is appended to `created` as soon as
    it exists, so a failure halfway leaves the caller a full list to delete."""
    for ns in namespaces(plan):
        create_namespace(ns)
        created.append(ns)
    ip_batch(SWITCH_NS, switch_commands(plan))
    for h in plan.hosts:
        ip_batch(h.namespace, host_commands(h))


def delete_namespace(ns: str) -> bool:
    """Delete one lab namespace (its links go with it); False if it was not there."""
    if not ns.startswith(PREFIX):
        raise TopologyError(f"refusing to delete {ns!r}: not a lab namespace")
    r = ip("netns", "del", ns, check=False)
    if r.returncode != 0 and (NETNS_DIR / ns).exists():
        raise TopologyError(f"cannot delete namespace {ns}: {r.stderr.strip()}")
    return r.returncode == 0


def set_port(plan: Plan, host: str, up: bool) -> None:
    ip_in(SWITCH_NS, "link", "set", plan.host(host).bridge_port, "up" if up else "down")


def blackhole(ns: str, addresses: Sequence[str], add: bool) -> None:
    for a in addresses:
        prefix = "/128" if ":" in a else "/32"
        if add:
            ip_in(ns, "route", "replace", "blackhole", a + prefix)
        else:
            r = ip_in(ns, "route", "del", "blackhole", a + prefix, check=False)
            if r.returncode != 0 and "No such process" not in r.stderr:
                raise TopologyError(f"cannot remove blackhole route to {a} in {ns}: {r.stderr.strip()}")


# ---- a loopback door into a namespace, for gRPC ----


@dataclass
class Forwarder:
    """Listens on 127.0.0.1 (root namespace loopback) and forwards each connection to `target` from inside
    namespace `ns`: gRPC's own threads open their sockets in this process's namespace, so this is how the
    process calls the controller in the lab."""

    ns: str
    target: tuple[str, int]

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"forward-{self.ns}", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = connect_in(self.ns, *self.target, timeout=2.0)
            except (OSError, TopologyError):
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            done = [0]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: list[int]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # one broken side ends the whole connection
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                done[0] += 1
                last = done[0] == 2
                if last:
                    self._open.difference_update((src, dst))
            if last:
                src.close()
                dst.close()

    def close(self) -> None:
        """Close every socket: an open socket would keep its namespace (and the lab's links) alive."""
        with self._lock:
            self._closed = True
            socks = list(self._open)
            self._open.clear()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
