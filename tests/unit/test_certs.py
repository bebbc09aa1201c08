"""`shadowctl certs`: names that would pass for another role are refused, private keys are written 0600 and
never through a symbolic link, and `init` warns that the CA key belongs off the hosts."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from shadowctl.cli import main as shadowctl
from shadowplane.pki import init_ca, issue


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
    link = ca / "agent-web-1.key"
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
