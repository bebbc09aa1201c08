"""Pointing a service's DNS name at its owner: RFC 2136 dynamic UPDATE (TSIG-signed), then a check.

A failover that moves a name rather than (or as well as) a VIP calls `point_record(cfg, address)`. It replaces
the name's A or AAAA records with the one address and deletes the other family's records too: a client that
prefers IPv6 must not keep reaching the failed primary through an old AAAA. Then it asks the server for the
name and compares, because a server can accept an update and still answer otherwise (a CNAME at the name, an
answer from another view, another writer).

Everything goes over TCP: the answer to an update must not be lost to a dropped datagram, and a refused
connection says "nothing listens there" at once where UDP would only time out.

Server-side and network problems never raise: they come back as `DnsResult(ok=False)` whose `detail` names the
cause and the fix, so the orchestrator can report it and go on with the VIP or the next shadow.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import socket
import time
from dataclasses import dataclass, field

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update

from controller.config import DnsConfig


@dataclass(frozen=True)
class DnsResult:
    """What `point_record` did.

    rcode: the server's answer to the UPDATE ("NOERROR", "REFUSED", "NOTAUTH", ...), "NOTAUTH/BADSIG",
    "NOTAUTH/BADKEY" or "NOTAUTH/BADTIME" when it rejected our TSIG signature, and for failures without an
    answer "TIMEOUT", "UNREACHABLE", "BADRESPONSE" or "CONFIG". ok=False with rcode "NOERROR" means the update
    was accepted but the check that followed saw something else.
    answer: the addresses of the updated family the server gave for the name afterwards.
    """

    ok: bool
    rcode: str
    detail: str
    seconds: float
    answer: list[str] = field(default_factory=list)


class DnsError(Exception):
    """A DNS exchange that failed: a short label (as in `DnsResult.rcode`) and what to do about it."""

    def __init__(self, rcode: str, detail: str) -> None:
        super().__init__(detail)
        self.rcode, self.detail = rcode, detail


@dataclass(frozen=True)
class _Target:
    """A DnsConfig checked and resolved once per call."""

    server: str  # as configured, for messages
    address: str  # the server's IP address
    port: int
    zone: dns.name.Name
    name: dns.name.Name
    key: dns.tsig.Key | None
    key_name: str
    algorithm: str
    timeout: float


async def point_record(cfg: DnsConfig, address: str) -> DnsResult:
    """Make `cfg.name` resolve to `address` alone on `cfg.server`, and check that it does."""
    start = time.monotonic()

    def result(ok: bool, rcode: str, detail: str, answer: list[str] | None = None) -> DnsResult:
        return DnsResult(ok, rcode, detail, time.monotonic() - start, answer or [])

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return result(False, "CONFIG", f"{address!r} is not an IP address: cannot point {cfg.name} at it")
    rdtype, other = (
        (dns.rdatatype.A, dns.rdatatype.AAAA) if ip.version == 4 else (dns.rdatatype.AAAA, dns.rdatatype.A)
    )
    try:
        t = await _target(cfg)
        update = dns.update.UpdateMessage(t.zone, keyring=t.key)
        update.delete(t.name, other)
        update.replace(t.name, cfg.ttl, rdtype, str(ip))
        response = await _exchange(t, update, f"updating {t.name}")
    except DnsError as e:
        return result(False, e.rcode, e.detail)
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        return result(False, dns.rcode.to_text(rcode), _update_refused(t, rcode))

    try:
        answer, stale = await asyncio.gather(_lookup(t, rdtype), _lookup(t, other))
    except DnsError as e:
        return result(False, e.rcode, f"the update was accepted (NOERROR) but checking it failed: {e.detail}")
    if {ipaddress.ip_address(a) for a in answer} != {ip} or stale:
        seen = ", ".join(answer + stale) or "no address"
        return result(
            False,
            "NOERROR",
            f"the update was accepted (NOERROR) but {t.server} now answers {seen} for {t.name}, not {ip}: "
            "is there a CNAME at that name, another view, or another writer updating it?",
            answer,
        )
    kind = dns.rdatatype.to_text(rdtype)
    return result(True, "NOERROR", f"{t.name} {kind} {ip} (TTL {cfg.ttl}) on {t.server}", answer)


async def current_record(cfg: DnsConfig) -> list[str]:
    """The addresses `cfg.name` has on `cfg.server` now, A records first ([] when none).

    Raises DnsError (with the same kind of detail as `DnsResult`) when the server cannot be asked: "no
    address" and "could not tell" must not look alike to the caller."""
    t = await _target(cfg)
    a, aaaa = await asyncio.gather(_lookup(t, dns.rdatatype.A), _lookup(t, dns.rdatatype.AAAA))
    return a + aaaa


async def _target(cfg: DnsConfig) -> _Target:
    host, _, port_text = cfg.server.rpartition(":")
    host = host.strip("[]")  # "[::1]:53" as well as "::1:53"
    if not host or not port_text.isdigit():
        raise DnsError("CONFIG", f"server: must be HOST:PORT, got {cfg.server!r}")
    port = int(port_text)
    try:
        zone = dns.name.from_text(cfg.zone)
        name = dns.name.from_text(cfg.name, origin=None)
    except dns.exception.DNSException as e:
        raise DnsError(
            "CONFIG", f"zone {cfg.zone!r} / name {cfg.name!r}: not a valid DNS name ({e})"
        ) from None
    if not name.is_absolute():
        # "web.lab.example" without its final dot means that absolute name; a plain "web" is relative to the
        # zone.
        as_absolute = name.concatenate(dns.name.root)
        name = as_absolute if as_absolute.is_subdomain(zone) else name.concatenate(zone)
    if not name.is_subdomain(zone):
        raise DnsError(
            "CONFIG",
            f"name {name} is not inside zone {zone}: the server would answer NOTZONE: fix name or zone",
        )
    return _Target(
        server=cfg.server,
        address=await _resolve(host, port, cfg.timeout_seconds),
        port=port,
        zone=zone,
        name=name,
        key=_key(cfg),
        key_name=cfg.tsig_name,
        algorithm=cfg.tsig_algorithm,
        timeout=cfg.timeout_seconds,
    )


def _key(cfg: DnsConfig) -> dns.tsig.Key | None:
    if not cfg.tsig_name:
        return None
    if not cfg.tsig_secret:
        raise DnsError(
            "CONFIG", f"tsig_secret is empty but tsig_name is {cfg.tsig_name!r}: set the key's secret"
        )
    # BIND spells it hmac-md5; on the wire (and in dnspython) it is HMAC-MD5.SIG-ALG.REG.INT.
    md5 = cfg.tsig_algorithm.lower().rstrip(".") == "hmac-md5"
    try:
        key = dns.tsig.Key(cfg.tsig_name, cfg.tsig_secret, dns.tsig.HMAC_MD5 if md5 else cfg.tsig_algorithm)
    except binascii.Error:
        raise DnsError(
            "CONFIG", "tsig_secret is not valid base64: copy the secret from the server's key statement"
        ) from None
    except dns.exception.DNSException as e:
        raise DnsError("CONFIG", f"tsig_name / tsig_algorithm: not a valid DNS name ({e})") from None
    # An unknown algorithm would otherwise only fail while signing, in the middle of the exchange.
    if key.algorithm not in dns.tsig.mac_sizes or key.algorithm == dns.tsig.GSS_TSIG:
        raise DnsError(
            "CONFIG",
            f"tsig_algorithm {cfg.tsig_algorithm!r} is not supported: use the server key's algorithm "
            "(hmac-sha256, hmac-sha512, hmac-sha1, ...)",
        )
    return key


async def _resolve(host: str, port: int, timeout: float) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        async with asyncio.timeout(timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise DnsError(
            "TIMEOUT", f"timeout after {timeout} s resolving the server name {host!r}: use its IP address"
        ) from None
    except OSError as e:
        raise DnsError(
            "UNREACHABLE", f"cannot resolve the server name {host!r} ({e}): use its IP address in server"
        ) from None
    return str(infos[0][4][0])


async def _lookup(t: _Target, rdtype: dns.rdatatype.RdataType) -> list[str]:
    query = dns.message.make_query(t.name, rdtype)
    query.flags &= ~dns.flags.RD  # ask the authority itself, never its cache
    if t.key is not None:
        query.use_tsig(t.key)
    kind = dns.rdatatype.to_text(rdtype)
    response = await _exchange(t, query, f"asking for {t.name} {kind}")
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return []
    if rcode != dns.rcode.NOERROR:
        raise DnsError(
            dns.rcode.to_text(rcode),
            f"{dns.rcode.to_text(rcode)}: {t.server} would not answer for {t.name} {kind}: "
            f"is it authoritative for {t.zone}, and does its allow-query let us in?",
        )
    rrset = response.get_rrset(response.answer, t.name, dns.rdataclass.IN, rdtype)
    return [rdata.to_text() for rdata in rrset] if rrset is not None else []


async def _exchange(t: _Target, message: dns.message.Message, what: str) -> dns.message.Message:
    """One TCP exchange with the server; every way it can fail becomes a DnsError saying what to do."""
    key = f"key {t.key_name!r}"
    try:
        # dnspython enforces the timeout itself; the outer one also bounds anything it might not cover.
        async with asyncio.timeout(t.timeout + 0.1):
            return await dns.asyncquery.tcp(message, t.address, timeout=t.timeout, port=t.port)
    except (TimeoutError, dns.exception.Timeout):
        raise DnsError(
            "TIMEOUT",
            f"timeout after {t.timeout} s talking to {t.server} ({what}): is the server reachable "
            "(address, port, firewall) and running?",
        ) from None
    except ConnectionRefusedError:
        raise DnsError(
            "UNREACHABLE",
            f"connection refused by {t.server} ({what}): nothing listens there: is the DNS server running, "
            "and is server its HOST:PORT?",
        ) from None
    except EOFError:
        raise DnsError(
            "BADRESPONSE",
            f"{t.server} closed the connection without answering ({what}): see the server's log",
        ) from None
    except OSError as e:
        raise DnsError(
            "UNREACHABLE",
            f"cannot reach {t.server} ({what}): {e.strerror or e}: check the address and the route to it",
        ) from None
    except dns.tsig.PeerBadSignature:
        raise DnsError(
            "NOTAUTH/BADSIG",
            f"NOTAUTH/BADSIG: {t.server} rejected the TSIG signature made with {key}: TSIG key mismatch: "
            "check tsig_secret (and tsig_algorithm) against the server's key statement",
        ) from None
    except dns.tsig.PeerBadKey:
        raise DnsError(
            "NOTAUTH/BADKEY",
            f"NOTAUTH/BADKEY: {t.server} does not know {key} with algorithm {t.algorithm}: check tsig_name "
            "and tsig_algorithm against the server's key statement",
        ) from None
    except dns.tsig.PeerBadTime:
        raise DnsError(
            "NOTAUTH/BADTIME",
            f"NOTAUTH/BADTIME: {t.server} saw our TSIG time ({key}) too far from its clock: "
            "synchronise the clocks (NTP)",
        ) from None
    except dns.tsig.PeerError as e:
        raise DnsError("NOTAUTH/TSIG", f"NOTAUTH: {t.server} rejected our TSIG ({key}): {e}") from None
    except (
        dns.tsig.BadSignature,
        dns.tsig.BadKey,
        dns.tsig.BadAlgorithm,
        dns.tsig.BadTime,
        dns.message.UnknownTSIGKey,
    ) as e:
        raise DnsError(
            "BADRESPONSE",
            f"the answer from {t.server} ({what}) failed TSIG verification with {key} "
            f"({type(e).__name__}): is another server answering on that address?",
        ) from None
    except dns.exception.DNSException as e:
        raise DnsError(
            "BADRESPONSE", f"malformed or unexpected answer from {t.server} ({what}): {e}"
        ) from None


def _update_refused(t: _Target, rcode: dns.rcode.Rcode) -> str:
    text = dns.rcode.to_text(rcode)
    if rcode == dns.rcode.REFUSED:
        if t.key is None:
            return (
                f"REFUSED: {t.server} refused an unsigned update of {t.zone}: set tsig_name and tsig_secret "
                "to a key that the zone's update-policy / allow-update grants"
            )
        return (
            f"REFUSED: {t.server} does not allow updates to {t.name} from key {t.key_name!r}: check that the "
            f"zone's allow-update / update-policy grants key {t.key_name} (A and AAAA at that name), and "
            "that the server is the zone's primary"
        )
    if rcode == dns.rcode.NOTAUTH:
        return (
            f"NOTAUTH: {t.server} is not authoritative for zone {t.zone}: check zone (spelling, final dot) "
            "and that server is the zone's primary"
        )
    if rcode == dns.rcode.NOTZONE:
        return f"NOTZONE: the server says {t.name} is not in zone {t.zone}: fix name or zone"
    if rcode == dns.rcode.NOTIMP:
        return (
            f"NOTIMP: {t.server} does not take dynamic updates for {t.zone}: is it a secondary? "
            "point server at the primary"
        )
    if rcode == dns.rcode.SERVFAIL:
        return (
            f"SERVFAIL: {t.server} failed to apply the update: see its log "
            "(zone not loaded? journal or zone directory not writable?)"
        )
    if rcode == dns.rcode.FORMERR:
        return f"FORMERR: {t.server} could not parse the update of {t.name}: see its log"
    return f"{text}: {t.server} rejected the update of {t.name}: see its log"
