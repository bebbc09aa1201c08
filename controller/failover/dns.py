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

`DnsUpdates` is what the orchestrator calls after a takeover: one updater per service that makes the first
attempt at once and, if it fails, retries with backoff until the record sticks or the service moves again
(the newer move cancels the older retry, so a late retry never points the name back at a host the service
has left). Every attempt and the final success are events with their reasons.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

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

log = logging.getLogger(__name__)


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


# Backoff between attempts: the first retry soon (a server restarting, a route coming back), then doubling up
# to a ceiling low enough that a repaired server gets the record within half a minute.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


class EventRecorder(Protocol):
    """`EventLog.record`: how an update's attempts become events."""

    def __call__(self, kind: str, service: str, host: str, reason: str, **detail: object) -> object: ...


@dataclass
class _Update:
    """One move's record update: where it points, and the task that retries it."""

    host: str
    address: str
    task: asyncio.Task[DnsResult | None]


class DnsUpdates:
    """Each service's latest DNS update, retried with backoff until it succeeds or the service moves again."""

    def __init__(
        self, first_delay: float = RETRY_FIRST_SECONDS, max_delay: float = RETRY_MAX_SECONDS
    ) -> None:
        self.first_delay, self.max_delay = first_delay, max_delay
        self._updates: dict[str, _Update] = {}

    async def point(
        self, service: str, cfg: DnsConfig, host: str, address: str, record: EventRecorder
    ) -> DnsResult:
        """Point `service`'s name at `address` (its new owner `host`): cancel an older move's retry, make the
        first attempt now and return its result; a failed attempt is retried in the background."""
        self.cancel(service, f"the service moved to {host}", record)
        first: asyncio.Future[DnsResult] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(service, cfg, host, address, record, first))
        self._updates[service] = _Update(host, address, task)
        return await first

    def cancel(self, service: str, why: str, record: EventRecorder) -> None:
        """Stop retrying `service`'s update (a newer move, the controller stopping)."""
        u = self._updates.pop(service, None)
        if u is not None and not u.task.done():
            u.task.cancel()
            record(
                "dns-retry-cancelled",
                service,
                u.host,
                f"stopped retrying to point the name at {u.host} ({u.address}): {why}",
            )

    def retrying(self, service: str) -> bool:
        u = self._updates.get(service)
        return u is not None and not u.task.done()

    async def settled(self, service: str) -> DnsResult | None:
        """The last result of `service`'s current update once it stops: its success, its last failure if it
        is not retried, or None if a newer move cancelled it."""
        u = self._updates.get(service)
        if u is None:
            return None
        try:
            return await asyncio.shield(u.task)
        except asyncio.CancelledError:
            if u.task.cancelled():
                return None
            raise

    async def close(self) -> None:
        tasks = [u.task for u in self._updates.values()]
        self._updates.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self,
        service: str,
        cfg: DnsConfig,
        host: str,
        address: str,
        record: EventRecorder,
        first: asyncio.Future[DnsResult],
    ) -> DnsResult | None:
        delay = self.first_delay
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    res = await point_record(cfg, address)
                except Exception as e:  # a bug, not the server: still an attempt that failed, and retried
                    log.exception("DNS update of %s failed unexpectedly", cfg.name)
                    res = DnsResult(False, "ERROR", f"{type(e).__name__}: {e}", 0.0)
                if not first.done():
                    first.set_result(res)
                if res.ok:
                    after = f" (attempt {attempt})" if attempt > 1 else ""
                    record(
                        "dns",
                        service,
                        host,
                        f"{cfg.name} -> {address} in {res.seconds * 1000:.0f} ms{after}",
                        attempts=attempt,
                    )
                    return res
                if res.rcode == "CONFIG":
                    # The settings themselves are wrong: no retry can succeed.
                    record("dns-failed", service, host, f"{res.detail} (not retried)", attempt=attempt)
                    return res
                record(
                    "dns-failed",
                    service,
                    host,
                    f"attempt {attempt}: {res.detail} (retrying in {delay:g} s)",
                    rcode=res.rcode,
                    attempt=attempt,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        except asyncio.CancelledError:
            if not first.done():
                first.cancel()
            raise


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
    # The same checks as check-config (DnsConfig.validate): a DnsConfig built in code skipped them.
    try:
        host, port = cfg.server_host_port()
        zone, name = cfg.names()
        key = cfg.tsig_key()
    except ValueError as e:
        raise DnsError("CONFIG", str(e)) from None
    return _Target(
        server=cfg.server,
        address=await _resolve(host, port, cfg.timeout_seconds),
        port=port,
        zone=zone,
        name=name,
        key=key,
        key_name=cfg.tsig_name,
        algorithm=cfg.tsig_algorithm,
        timeout=cfg.timeout_seconds,
    )


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
