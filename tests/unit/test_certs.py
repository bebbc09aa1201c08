"""`shadowctl certs`: names that would pass for another role are refused, private keys are written 0600 and
never through a symbolic link, `init` warns that the CA key belongs off the hosts, and `issue` writes the
files under the names the packaged configurations read."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agentd.config import load_agent_config
from controller.config import load_controller_config
from shadowctl import certs_cmds
from shadowctl.cli import main as shadowctl
from shadowctl.client import DEFAULT_CA, DEFAULT_CERT, DEFAULT_KEY
from shadowplane.pki import identity_from_pem, init_ca, issue

ROOT = Path(__file__).resolve().parents[2]
TLS_DIR = Path("/etc/shadowplane/tls")


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    init_ca(d)
    return d


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: a file created without an explicit mode would come out world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["shadowplane-controller"], "name 'shadowplane-controller' is reserved"),
        (["Shadowplane-Agent", "--role", "operator"], "name 'Shadowplane-Agent' is reserved"),
        (["web-1", "--san", "shadowplane-controller"], "--san 'shadowplane-controller' is reserved"),
        (
            ["ctl", "--role", "controller", "--san", "shadowplane-agent"],
            "--san 'shadowplane-agent' is reserved",
        ),
        (["controller"], "reserved for agents"),
    ],
)
def test_reserved_names_are_refused_and_nothing_is_written(
    ca: Path, args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in ca.iterdir())
    assert shadowctl(["certs", "issue", *args, "--dir", str(ca)]) == 1
    err = capsys.readouterr().err
    assert words in err and "another name" in err
    assert sorted(p.name for p in ca.iterdir()) == before


def test_controller_may_be_the_controller_certificate_name(ca: Path) -> None:
    # Only an agent named "controller" is ambiguous (a service's observer "controller" is the controller).
    out = issue(ca, "controller", "controller")
    sans = x509.load_pem_x509_certificate(out.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["controller", "shadowplane-controller"]


def test_private_keys_are_0600_even_with_umask_0_and_over_a_wider_file(ca: Path, open_umask: None) -> None:
    assert mode(ca / "ca.key") == 0o600  # made by the fixture, under the usual umask
    key = ca / "agent-web-1.key"
    key.write_text("an older key, world-readable")
    key.chmod(0o644)
    out = issue(ca, "web-1", "agent")
    assert out.key == key
    assert mode(key) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert mode(out.cert) == 0o644
    fresh = ca.parent / "fresh"
    init_ca(fresh)
    assert mode(fresh / "ca.key") == 0o600
    assert not [p for p in fresh.iterdir() if p.name.endswith(".tmp")], "no temporary file is left"


@pytest.mark.parametrize("dangling", [False, True])
def test_a_key_is_never_written_through_a_symbolic_link(
    ca: Path, tmp_path: Path, dangling: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious")
    link = ca / "web-1" / "agent.key"  # in web-1's bundle
    link.parent.mkdir()
    link.symlink_to(victim)
    assert shadowctl(["certs", "issue", "web-1", "--dir", str(ca)]) == 1
    err = capsys.readouterr().err
    assert f"{link} is a symbolic link (to {victim})" in err and f"rm {link}" in err
    assert link.is_symlink()
    if dangling:
        assert not victim.exists(), "nothing was created where the link points"
    else:
        assert victim.read_text() == "precious"


def test_ca_key_link_is_refused_at_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "tls"
    d.mkdir()
    (d / "ca.key").symlink_to(tmp_path / "elsewhere")
    assert shadowctl(["certs", "init", "--dir", str(d)]) == 1
    assert "is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_init_warns_once_that_the_ca_key_belongs_off_the_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "tls"
    assert shadowctl(["certs", "init", "--dir", str(d)]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning") == 1
    assert str(d / "ca.key") in err and "off the hosts" in err and "offline" in err
    assert "warning" not in out
    assert shadowctl(["certs", "issue", "web-1", "--dir", str(d)]) == 0
    assert "warning" not in capsys.readouterr().err, "only init warns"


def shipped_tls_names() -> dict[str, list[str]]:
    """What each party reads in /etc/shadowplane/tls/, by the packaged configurations and shadowctl's
    defaults (file names; every path must be in that directory)."""
    agent = load_agent_config(ROOT / "packaging/etc/agentd.toml").tls
    ctl = load_controller_config(ROOT / "packaging/etc/controller.toml").tls
    out = {}
    for role, paths in (
        ("agent", [agent.ca, agent.cert, agent.key]),
        ("controller", [ctl.ca, ctl.cert, ctl.key]),
        ("operator", [DEFAULT_CA, DEFAULT_CERT, DEFAULT_KEY]),
    ):
        assert all(p is not None and p.parent == TLS_DIR for p in paths), (role, paths)
        out[role] = [p.name for p in paths if p is not None]
    return out


def test_a_bundle_holds_exactly_the_files_the_packaged_configs_read(
    ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wanted = shipped_tls_names()
    assert wanted == {
        "agent": ["ca.pem", "agent.pem", "agent.key"],
        "controller": ["ca.pem", "controller.pem", "controller.key"],
        "operator": ["ca.pem", "shadowctl.pem", "shadowctl.key"],
    }
    for name, role in (("web-1", "agent"), ("ctl-1", "controller"), ("alice", "operator")):
        assert shadowctl(["certs", "issue", name, "--role", role, "--dir", str(ca)]) == 0
        bundle = ca / name
        assert sorted(p.name for p in bundle.iterdir()) == sorted(wanted[role]), role
        assert mode(bundle) == 0o700 and mode(bundle / wanted[role][2]) == 0o600
        assert (bundle / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()
        ident = identity_from_pem((bundle / wanted[role][1]).read_bytes())
        assert (ident.name, ident.role) == (name, role)
        out = capsys.readouterr().out
        assert f"cp -p {bundle}/* /etc/shadowplane/tls/" in out, out
        if role == "controller":  # no group `shadowplane` here, or not this host's directory
            assert "chgrp shadowplane /etc/shadowplane/tls/controller.key" in out, out


def test_one_host_shares_a_bundle_directory_between_its_roles(ca: Path, tmp_path: Path) -> None:
    """A one-host trial: the agent's, the controller's and an operator's files side by side, one ca.pem."""
    here = tmp_path / "here"
    for name, role in (("box", "agent"), ("box", "controller"), ("me", "operator")):
        assert shadowctl(["certs", "issue", name, "--role", role, "--dir", str(ca), "--out", str(here)]) == 0
    assert sorted(p.name for p in here.iterdir()) == sorted(
        {n for names in shipped_tls_names().values() for n in names}
    )


def test_install_writes_into_this_hosts_tls_directory(
    ca: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stand-in for /etc/shadowplane/tls: a test does not write into this machine's /etc.
    host_tls = tmp_path / "etc-shadowplane-tls"
    monkeypatch.setattr(certs_cmds, "TLS_DIR", host_tls)
    assert shadowctl(["certs", "issue", "web-1", "--dir", str(ca), "--install"]) == 0
    assert sorted(p.name for p in host_tls.iterdir()) == ["agent.key", "agent.pem", "ca.pem"]
    assert mode(host_tls) == 0o755, "the controller's user must reach its files there"
    assert "copy" not in capsys.readouterr().out, "nothing to copy: the files are where they are read"
    # A host that trusts another fleet's CA is not silently given this one's certificate.
    other = tmp_path / "other-ca"
    init_ca(other)
    capsys.readouterr()
    assert shadowctl(["certs", "issue", "web-1", "--dir", str(other), "--install"]) == 1
    err = capsys.readouterr().err
    assert f"{host_tls / 'ca.pem'} is another CA's certificate" in err and "--dir" in err, err
    assert identity_from_pem((host_tls / "agent.pem").read_bytes()).name == "web-1"
    assert (host_tls / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes(), "left as it was"


@pytest.mark.parametrize("name", ["../web-1", "a/b", ".hidden", ""])
def test_a_name_that_is_no_file_name_is_refused(
    ca: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in ca.parent.rglob("*"))
    assert shadowctl(["certs", "issue", name, "--dir", str(ca)]) == 1
    assert "without '/' or a leading '.'" in capsys.readouterr().err
    assert sorted(p.name for p in ca.parent.rglob("*")) == before
