"""DNS switching against a real BIND 9 (named) started by the test: RFC 2136 updates signed with TSIG."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

from controller.config import ControllerConfig, DnsConfig
from controller.failover.dns import DnsResult, DnsUpdates, current_record, point_record
from lab.bind import make_tsig_secret, start_bind, stop_bind
from lab.procs import free_port
from shadowplane.config import ConfigError, build
from tests.support import need, need_root

ZONE = "lab.example."
KEY = "shadowplane-test"


@dataclass(frozen=True)
class Bind:
    port: int
    secret: str
    workdir: Path

    def cfg(self, **changes: object) -> DnsConfig:
        base = DnsConfig(
            server=f"127.0.0.1:{self.port}",
            zone=ZONE,
            name=f"web.{ZONE}",
            ttl=30,
            tsig_name=KEY,
            tsig_secret=self.secret,
            timeout_seconds=2.0,
        )
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def need_named() -> None:
    need_root()
    need(
        shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin"),
        "named (BIND 9) is not installed",
        "apt-get install bind9 (make setup does: scripts/apt-packages.txt)",
    )


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
    need_named()
    workdir = tmp_path_factory.mktemp("bind")
    secret = make_tsig_secret()
    port = free_port()
    records = {"web": "10.77.0.11", "api": "10.77.0.12", "db": "10.77.0.13", "mail": "10.77.0.14"}
    proc = start_bind(workdir, None, "127.0.0.1", port, ZONE, records, KEY, secret)
    try:
        yield Bind(port, secret, workdir)
    finally:
        stop_bind(proc)
        assert proc.returncode is not None, "named is still running"


def ask(b: Bind, name: str, rdtype: dns.rdatatype.RdataType) -> list[str]:
    """A fresh query, independent of the code under test."""
    r = dns.query.tcp(dns.message.make_query(name, rdtype), "127.0.0.1", port=b.port, timeout=2)
    rrset = r.get_rrset(r.answer, dns.name.from_text(name), dns.rdataclass.IN, rdtype)
    return sorted(rd.to_text() for rd in rrset) if rrset else []


def test_point_record_switches_the_address(bind: Bind) -> None:
    cfg = bind.cfg()
    assert asyncio.run(current_record(cfg)) == ["10.77.0.11"]
    result = asyncio.run(point_record(cfg, "10.77.0.21"))
    assert result.ok, result.detail
    assert result.rcode == "NOERROR"
    assert result.answer == ["10.77.0.21"]
    assert 0 < result.seconds < 2
    assert ask(bind, f"web.{ZONE}", dns.rdatatype.A) == ["10.77.0.21"]
    assert asyncio.run(current_record(cfg)) == ["10.77.0.21"]
    # Pointing it again at the same address is no change and still fine (a retried failover).
    assert asyncio.run(point_record(cfg, "10.77.0.21")).ok


def test_ipv6_address_replaces_a_with_aaaa(bind: Bind) -> None:
    cfg = bind.cfg(name="api")  # relative to the zone
    result = asyncio.run(point_record(cfg, "fd00:77::21"))
    assert result.ok, result.detail
    assert result.answer == ["fd00:77::21"]
    assert ask(bind, f"api.{ZONE}", dns.rdatatype.AAAA) == ["fd00:77::21"]
    assert ask(bind, f"api.{ZONE}", dns.rdatatype.A) == []
    # And back: the AAAA goes when an IPv4 address comes.
    assert asyncio.run(point_record(cfg, "10.77.0.22")).ok
    assert asyncio.run(current_record(cfg)) == ["10.77.0.22"]


def test_wrong_tsig_secret_is_reported_as_a_key_mismatch(bind: Bind) -> None:
    result = asyncio.run(
        point_record(bind.cfg(name=f"db.{ZONE}", tsig_secret=make_tsig_secret()), "10.77.0.23")
    )
    assert not result.ok
    assert result.rcode == "NOTAUTH/BADSIG"
    assert "signature" in result.detail and KEY in result.detail and "tsig_secret" in result.detail
    assert ask(bind, f"db.{ZONE}", dns.rdatatype.A) == ["10.77.0.13"]


def test_unknown_key_name_is_reported(bind: Bind) -> None:
    result = asyncio.run(point_record(bind.cfg(name=f"db.{ZONE}", tsig_name="nobody"), "10.77.0.23"))
    assert not result.ok
    assert result.rcode == "NOTAUTH/BADKEY"
    assert "'nobody'" in result.detail and "tsig_name" in result.detail


def test_unsigned_update_is_refused(bind: Bind) -> None:
    result = asyncio.run(
        point_record(bind.cfg(name=f"mail.{ZONE}", tsig_name="", tsig_secret=""), "10.77.0.24")
    )
    assert not result.ok
    assert result.rcode == "REFUSED"
    assert "unsigned" in result.detail and "tsig_name" in result.detail
    assert ask(bind, f"mail.{ZONE}", dns.rdatatype.A) == ["10.77.0.14"]


def test_zone_the_server_does_not_serve(bind: Bind) -> None:
    result = asyncio.run(
        point_record(bind.cfg(zone="other.example.", name="web.other.example."), "10.77.0.25")
    )
    assert not result.ok
    assert result.rcode == "NOTAUTH"
    assert "not authoritative for zone other.example." in result.detail


def test_nothing_listening_fails_fast() -> None:
    # Over TCP a closed port is refused at once: no need to wait for the timeout to know.
    cfg = DnsConfig(server=f"127.0.0.1:{free_port()}", zone=ZONE, name=f"web.{ZONE}", timeout_seconds=2.0)
    result = asyncio.run(point_record(cfg, "10.77.0.21"))
    assert not result.ok
    assert result.rcode == "UNREACHABLE"
    assert "refused" in result.detail and cfg.server in result.detail
    assert result.seconds < 2.0


def test_server_that_never_answers_times_out() -> None:
    # A listening socket that never accepts: the kernel completes the handshake, nobody answers (as with a
    # hung server or a firewall that drops the answers).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cfg = DnsConfig(server=f"127.0.0.1:{port}", zone=ZONE, name=f"web.{ZONE}", timeout_seconds=1.0)
        result = asyncio.run(point_record(cfg, "10.77.0.21"))
    assert not result.ok
    assert result.rcode == "TIMEOUT"
    assert f"timeout after 1.0 s talking to 127.0.0.1:{port}" in result.detail
    assert 0.9 <= result.seconds < 1.6


def test_bad_settings_are_reported_without_a_server() -> None:
    cfg = DnsConfig(server=f"127.0.0.1:{free_port()}", zone=ZONE, name="web.elsewhere.", tsig_name=KEY)
    assert "not inside zone" in asyncio.run(point_record(cfg, "10.77.0.21")).detail
    bad_secret = dataclasses.replace(cfg, name="web", tsig_secret="not base64!")
    assert "tsig_secret: not valid base64" in asyncio.run(point_record(bad_secret, "10.77.0.21")).detail
    assert asyncio.run(point_record(cfg, "not-an-address")).rcode == "CONFIG"


def test_start_bind_reports_why_named_did_not_come_up(tmp_path: Path) -> None:
    need_named()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="unable to listen on any configured interfaces") as err:
            start_bind(tmp_path, None, "127.0.0.1", port, ZONE, {}, KEY, make_tsig_secret())
    assert "named.log" in str(err.value)


# ---- retries ----


class Events:
    """What DnsUpdates records, as EventLog.record receives it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, kind: str, service: str, host: str, reason: str, **detail: object) -> object:
        self.seen.append((kind, host, reason))
        return None

    def kinds(self, host: str) -> list[str]:
        return [k for k, h, _ in self.seen if h == host]


def later_bind(tmp_path: Path, port: int, secret: str) -> subprocess.Popen[bytes]:
    records = {"web": "10.77.0.11"}
    return start_bind(tmp_path / "bind", None, "127.0.0.1", port, ZONE, records, KEY, secret)


def down_then_up(tmp_path: Path, moves: list[tuple[str, str]]) -> tuple[DnsResult | None, Events, list[str]]:
    """The server is down while `moves` (host, address) happen, one after the other, then comes up.
    Returns the last update's final result, the events, and what the server answers then."""
    port, secret = free_port(), make_tsig_secret()
    cfg = DnsConfig(
        server=f"127.0.0.1:{port}", zone=ZONE, name=f"web.{ZONE}", tsig_name=KEY, tsig_secret=secret
    )
    events = Events()
    procs: list[subprocess.Popen[bytes]] = []

    async def go() -> DnsResult | None:
        updates = DnsUpdates(first_delay=0.1, max_delay=0.5)
        try:
            for host, address in moves:
                first = await updates.point("web", cfg, host, address, events)
                assert not first.ok and first.rcode == "UNREACHABLE", first
                assert updates.retrying("web")
            procs.append(await asyncio.to_thread(later_bind, tmp_path, port, secret))
            async with asyncio.timeout(60):  # a hang guard, not a measurement
                return await updates.settled("web")
        finally:
            await updates.close()

    try:
        result = asyncio.run(go())
        answer = ask(Bind(port, secret, tmp_path), f"web.{ZONE}", dns.rdatatype.A)
    finally:
        for proc in procs:
            stop_bind(proc)
    return result, events, answer


def test_a_server_that_comes_up_later_gets_the_record_after_a_retry(tmp_path: Path) -> None:
    need_named()
    result, events, answer = down_then_up(tmp_path, [("s1", "10.77.0.41")])
    assert result is not None and result.ok, result
    assert answer == ["10.77.0.41"]
    kinds = events.kinds("s1")
    assert kinds[0] == "dns-failed" and kinds[-1] == "dns" and kinds.count("dns") == 1
    failed = [r for k, _, r in events.seen if k == "dns-failed"]
    assert failed[0].startswith("attempt 1: connection refused") and "retrying in 0.1 s" in failed[0]
    done = events.seen[-1][2]
    assert done.startswith(f"web.{ZONE} -> 10.77.0.41") and f"(attempt {len(failed) + 1})" in done


def test_a_newer_move_cancels_the_older_retry(tmp_path: Path) -> None:
    need_named()
    result, events, answer = down_then_up(tmp_path, [("s1", "10.77.0.41"), ("p1", "10.77.0.42")])
    assert result is not None and result.ok, result
    assert answer == ["10.77.0.42"], "the newest owner's address, never the older move's"
    assert events.kinds("s1")[-1] == "dns-retry-cancelled" and "dns" not in events.kinds("s1")
    cancelled = next(r for k, _, r in events.seen if k == "dns-retry-cancelled")
    assert "10.77.0.41" in cancelled and "moved to p1" in cancelled
    assert events.kinds("p1")[-1] == "dns"


def test_a_configuration_error_is_not_retried() -> None:
    cfg = DnsConfig(server=f"127.0.0.1:{free_port()}", zone=ZONE, name=f"web.{ZONE}")
    events = Events()

    async def go() -> tuple[DnsResult, DnsResult | None]:
        updates = DnsUpdates(first_delay=0.1)
        first = await updates.point("web", cfg, "s1", "", events)  # a host without an address
        return first, await updates.settled("web")

    first, final = asyncio.run(go())
    assert first.rcode == "CONFIG" and final == first
    assert events.seen == [("dns-failed", "s1", f"{first.detail} (not retried)")]


# ---- check-config ----


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"server": "10.0.0.53"}, "server", "HOST:PORT"),
        ({"server": "10.0.0.53:70000"}, "server", "HOST:PORT"),
        ({"server": "ns_1..example:53"}, "server", "neither an IP address nor a host name"),
        ({"server": "10.0.0.999:53"}, "server", "use the DNS server's IP address"),
        ({"zone": "lab..example."}, "zone", "not a valid DNS name"),
        ({"name": "web.elsewhere."}, "name", "not inside zone lab.example.: the server would answer NOTZONE"),
        ({"tsig_secret": ""}, "tsig_secret", "empty, but tsig_name is 'shadowplane-test'"),
        ({"tsig_secret": "not base64!"}, "tsig_secret", "not valid base64: copy the secret"),
        ({"tsig_name": ""}, "tsig_name", "tsig_secret is set"),
        ({"tsig_algorithm": "hmac-sha3"}, "tsig_algorithm", "not supported: use the server key's algorithm"),
        ({"ttl": -1}, "ttl", "between 0 and 86400"),
    ],
)
def test_dns_settings_are_checked_by_check_config(changes: dict[str, object], field: str, words: str) -> None:
    good: dict[str, object] = {
        "server": "10.0.0.53:53",
        "zone": ZONE,
        "name": "web",
        "tsig_name": KEY,
        "tsig_secret": make_tsig_secret(),
    }

    def controller(dns_table: dict[str, object]) -> ControllerConfig:
        return build(
            ControllerConfig,
            {
                "tls": {"plaintext": True},
                "host": [{"name": "p1", "address": "10.0.0.1"}, {"name": "s1", "address": "10.0.0.2"}],
                "service": [{"name": "web", "primary": "p1", "shadows": ["s1"], "dns": dns_table}],
            },
            "controller.toml",
        )

    assert controller(good).service[0].dns is not None
    with pytest.raises(ConfigError) as e:
        controller({**good, **changes})
    assert e.value.field == f"service[0].dns.{field}"
    assert words in e.value.problem


def test_check_config_wants_an_address_for_every_host_the_record_may_point_at() -> None:
    dns_table = {"server": "10.0.0.53:53", "zone": ZONE, "name": "web"}
    with pytest.raises(ConfigError) as e:
        build(
            ControllerConfig,
            {
                "tls": {"plaintext": True},
                "host": [{"name": "p1", "address": "10.0.0.1"}, {"name": "s1"}],
                "service": [{"name": "web", "primary": "p1", "shadows": ["s1"], "dns": dns_table}],
            },
        )
    assert e.value.field == "service[0].dns" and "set its [[host]] address" in e.value.problem
