"""DNS switching against a real BIND 9 (named) started by the test: RFC 2136 updates signed with TSIG."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

from controller.config import DnsConfig
from controller.failover.dns import current_record, point_record
from lab.bind import make_tsig_secret, start_bind, stop_bind
from lab.procs import free_port
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
    assert "tsig_secret is not valid base64" in asyncio.run(point_record(bad_secret, "10.77.0.21")).detail
    assert asyncio.run(point_record(cfg, "not-an-address")).rcode == "CONFIG"


def test_start_bind_reports_why_named_did_not_come_up(tmp_path: Path) -> None:
    need_named()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="unable to listen on any configured interfaces") as err:
            start_bind(tmp_path, None, "127.0.0.1", port, ZONE, {}, KEY, make_tsig_secret())
    assert "named.log" in str(err.value)
