"""A real BIND 9 (`named`) for the lab and the tests: one primary zone that takes TSIG-signed updates.

Everything the server writes (pid and lock files, session key, journal, log) stays in its work directory, so
several can run side by side, next to the system's own named, and nothing is left behind but that directory.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from lab.procs import spawn, stop

START_TIMEOUT_SECONDS = 10.0
TSIG_ALGORITHM = "hmac-sha256"
_CLONE_NEWNET = 0x40000000
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Lines named logs and then carries on without serving: no point waiting the whole timeout for an answer.
_FATAL_LOG_LINES = ("not loaded due to errors", "unable to listen on any configured interfaces")
_APPARMOR_PROFILES = Path("/sys/kernel/security/apparmor/profiles")


def make_tsig_secret() -> str:
    """A random TSIG secret, base64 (32 bytes, as `tsig-keygen -a hmac-sha256` makes)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def start_bind(
    workdir: Path,
    netns: str | None,
    listen: str,
    port: int,
    zone: str,
    records: dict[str, str],
    tsig_name: str,
    tsig_secret: str,
) -> subprocess.Popen[bytes]:
    """Start named serving `zone` (SOA, NS and `records`: name -> address) on `listen:port` only, inside the
    network namespace `netns` if given. Updates signed with the TSIG key `tsig_name` (hmac-sha256) may change
    any name in the zone; an empty `tsig_name` makes the zone read-only. Returns once named answers a SOA
    query for the zone; raises RuntimeError with the tail of named's log if it does not within 10 s."""
    ip = ipaddress.ip_address(listen)
    origin = dns.name.from_text(zone)
    if tsig_name and not _KEY_NAME.match(tsig_name):
        raise ValueError(f"tsig_name {tsig_name!r}: use letters, digits, '.', '-' and '_'")
    if tsig_name:
        try:
            base64.b64decode(tsig_secret, validate=True)
        except binascii.Error:
            raise ValueError("tsig_secret must be base64 (see make_tsig_secret)") from None
    workdir = workdir.resolve()
    if '"' in str(workdir):
        raise ValueError(f"workdir {workdir}: named.conf cannot quote a path containing '\"'")
    workdir.mkdir(parents=True, exist_ok=True)
    named = _named_binary(workdir)

    zone_file = workdir / "zone.db"
    journal = workdir / "zone.db.jnl"
    # The zone file is written afresh: a journal from an earlier run would not match it and named would
    # refuse to load the zone.
    journal.unlink(missing_ok=True)
    zone_file.write_text(_zone_text(origin, ip, records))
    conf = workdir / "named.conf"
    conf.write_text(_named_conf(workdir, ip, port, origin, zone_file, journal, tsig_name, tsig_secret))

    log = workdir / "named.log"
    log.unlink(missing_ok=True)
    # -g: foreground, and every message (config errors included) to stderr, which spawn sends to the log
    # file; named ignores the logging statement under -g, so the config has none. No -u: as root named then
    # stays root, which the lab is anyway, and the files in workdir need no particular owner.
    proc = spawn([named, "-g", "-c", str(conf)], log, netns=netns)
    try:
        _wait_for_soa(proc, netns, _reachable(ip), port, origin, log)
    except BaseException:
        stop_bind(proc)
        raise
    return proc


def stop_bind(proc: subprocess.Popen[bytes]) -> None:
    """Stop named (and anything in its process group): SIGTERM, SIGKILL after 5 s."""
    stop(proc)


def _named_binary(workdir: Path) -> str:
    named = shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin")
    if named is None:
        raise FileNotFoundError("named (BIND 9) is not installed: apt-get install bind9")
    if _apparmor_confines_named():
        # Debian's AppArmor profile for /usr/sbin/named lets it touch only /etc/bind, /var/lib/bind,
        # /var/cache/bind and /run/named, not a lab work directory. The profile attaches by path, so a copy
        # of the binary runs unconfined, like every other lab process.
        copy = workdir / "named"
        shutil.copy2(named, copy)
        return str(copy)
    return named


def _apparmor_confines_named() -> bool:
    try:
        profiles = _APPARMOR_PROFILES.read_text()
    except OSError:
        return False  # no AppArmor (or not allowed to look, and then not root: named needs no care either)
    return any(
        line.startswith(("named (enforce)", "/usr/sbin/named (enforce)")) for line in profiles.splitlines()
    )


def _reachable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Where to ask a server that listens on `ip` (a wildcard listens on loopback too)."""
    if ip.is_unspecified:
        return "127.0.0.1" if ip.version == 4 else "::1"
    return str(ip)


def _zone_text(
    origin: dns.name.Name, listen: ipaddress.IPv4Address | ipaddress.IPv6Address, records: dict[str, str]
) -> str:
    lines = [
        f"$ORIGIN {origin}",
        "$TTL 60",
        f"@ IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60",
        "@ IN NS ns",
    ]
    if "ns" not in records:
        # named will not load a zone whose in-zone NS name has no address.
        ns = _reachable(listen)
        lines.append(f"ns IN {'A' if ipaddress.ip_address(ns).version == 4 else 'AAAA'} {ns}")
    for name, address in records.items():
        owner = dns.name.from_text(name, origin=None)
        if owner.is_absolute() and not owner.is_subdomain(origin):
            raise ValueError(f"record {name!r} is not inside zone {origin}")
        ip = ipaddress.ip_address(address)
        lines.append(f"{owner} IN {'A' if ip.version == 4 else 'AAAA'} {ip}")
    return "\n".join(lines) + "\n"


def _named_conf(
    workdir: Path,
    listen: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    origin: dns.name.Name,
    zone_file: Path,
    journal: Path,
    tsig_name: str,
    tsig_secret: str,
) -> str:
    if listen.version == 4:
        listen_on = f"listen-on port {port} {{ {listen}; }};\n    listen-on-v6 {{ none; }};"
    else:
        listen_on = f"listen-on {{ none; }};\n    listen-on-v6 port {port} {{ {listen}; }};"
    key = update = ""
    if tsig_name:
        key = f'key "{tsig_name}" {{\n    algorithm {TSIG_ALGORITHM};\n    secret "{tsig_secret}";\n}};\n'
        update = f'\n    update-policy {{ grant "{tsig_name}" zonesub ANY; }};'
    # The defaults of pid-file, lock-file and session-keyfile are under /run/named, shared with the system's
    # named and with other lab servers: each server keeps its own in workdir.
    return f"""// Written by lab.bind: a lab-only authoritative server.
options {{
    directory "{workdir}";
    pid-file "{workdir}/named.pid";
    lock-file "{workdir}/named.lock";
    session-keyfile "{workdir}/session.key";
    managed-keys-directory "{workdir}";
    {listen_on}
    recursion no;
    dnssec-validation no;
    allow-transfer {{ none; }};
    notify no;
}};

// No rndc: without an empty controls statement named reads /etc/bind/rndc.key and listens on 127.0.0.1:953,
// which the system's named or another lab server may hold.
controls {{ }};

{key}
zone "{origin}" {{
    type primary;
    file "{zone_file}";
    journal "{journal}";{update}
}};
"""


def _wait_for_soa(
    proc: subprocess.Popen[bytes],
    netns: str | None,
    address: str,
    port: int,
    origin: dns.name.Name,
    log: Path,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    family = socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6
    where = f"{address}:{port}" + (f" in netns {netns}" if netns else "")
    last = "no answer yet"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"named exited with status {proc.returncode} before serving {origin} on {where}; "
                f"last lines of {log}:\n{_tail(log)}"
            )
        fatal = next((m for m in _FATAL_LOG_LINES if m in _read(log)), None)
        if fatal:
            raise RuntimeError(f"named failed ({fatal!r}) serving {origin} on {where}; {log}:\n{_tail(log)}")
        try:
            with _udp_socket(family, netns) as sock:
                query = dns.message.make_query(origin, dns.rdatatype.SOA)
                response = dns.query.udp(query, address, port=port, timeout=0.2, sock=sock)
            if response.get_rrset(response.answer, origin, dns.rdataclass.IN, dns.rdatatype.SOA):
                return
            last = f"answer {dns.rcode.to_text(response.rcode())} without the SOA"
        except (dns.exception.DNSException, OSError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"named did not answer a SOA query for {origin} on {where} within {START_TIMEOUT_SECONDS} s "
                f"(last: {last}); last lines of {log}:\n{_tail(log)}"
            )
        time.sleep(0.05)


def _udp_socket(family: int, netns: str | None) -> socket.socket:
    def make() -> socket.socket:
        return socket.socket(family, socket.SOCK_DGRAM)

    sock = make() if netns is None else _in_netns(netns, make)
    sock.setblocking(False)  # dnspython wants a non-blocking socket when it is handed one
    return sock


def _in_netns(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Make a socket inside a network namespace. setns(2) moves only the calling thread, so a throwaway thread
    does it and the caller stays where it is; the socket keeps the namespace it was made in."""
    box: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into network namespace {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box.append(make())
        except BaseException as e:
            box.append(e)

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    (result,) = box
    if isinstance(result, BaseException):
        raise result
    return result


def _read(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(_read(log).splitlines()[-lines:]) or "(empty)"
