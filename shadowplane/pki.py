"""A small certificate authority for a fleet that has none: `shadowctl certs init|issue`.

Roles live in the certificate's organizational unit: "agent" (a host; its common name is the host name),
"controller", "operator" (a person or tool allowed to change things). Every certificate also names its role
as a DNS SAN (`shadowplane-agent`, `shadowplane-controller`) so a peer can verify it by role without
knowing every host's address.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["agent", "controller", "operator"]
ROLES: tuple[Role, ...] = ("agent", "controller", "operator")
ROLE_SAN = {"agent": "shadowplane-agent", "controller": "shadowplane-controller"}
# Peers verify a role by these SANs (shadowplane/tls.py), so a certificate that carried one as its own name
# or as an extra SAN would pass as that role. "controller" names the controller in a service's observers, so
# an agent by that name would be taken for the controller there.
RESERVED_NAMES = frozenset(ROLE_SAN.values())
RESERVED_AGENT_NAMES = frozenset({"controller"})
# The names the packaged configurations read in /etc/shadowplane/tls/ (agentd.toml's and controller.toml's
# [tls], shadowctl's --cert/--key defaults), so that a bundle's files are used where they land.
INSTALLED_STEM: dict[Role, str] = {"agent": "agent", "controller": "controller", "operator": "shadowctl"}


class PkiError(RuntimeError):
    pass


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    ca: Path | None = None  # the CA certificate beside them, in a bundle


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `path` as a new file created with `mode` (never chmod-ed afterwards, so it is never readable by
    others for a moment), without following a symbolic link at `path`.

    The data goes to a new file made with O_CREAT|O_EXCL|O_NOFOLLOW beside it, which is then renamed over
    `path`: rename replaces a link rather than writing through it, and a file that existed with a wider mode
    is replaced, not truncated (truncating would keep its mode). A link that is already there is refused:
    writing a key as root through a link someone planted would put it wherever they chose.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise PkiError(
            f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through it; "
            f"remove the link (rm {path}) or use another --dir"
        )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as e:
        raise PkiError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write_file(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_file(path, data, 0o644)


def check_names(name: str, role: str, sans: tuple[str, ...]) -> None:
    """Refuse names that would let the certificate pass for something it is not, or that are no file name."""
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"name {name!r} must be a host or person's name, without '/' or a leading '.'")
    for what, n in [("name", name)] + [("--san", s) for s in sans]:
        if n.lower() in RESERVED_NAMES:
            raise PkiError(
                f"{what} {n!r} is reserved: peers recognise the {n.removeprefix('shadowplane-')} role by it, "
                "so no certificate may carry it by name (shadowctl adds it to the right role's certificates "
                "itself); choose another name"
            )
    if role == "agent" and name.lower() in RESERVED_AGENT_NAMES:
        raise PkiError(
            f"name {name!r} is reserved for agents: services name the controller as the observer "
            '"controller"; give the host another name (its `host` in agentd.toml)'
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(directory: Path, name: str = "Shadowplane fleet CA", days: int = 3650) -> Issued:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists():
        raise PkiError(f"{cert_path} exists already: a fleet has one CA (remove it to start over)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


def issue(
    directory: Path,
    name: str,
    role: Role,
    sans: tuple[str, ...] = (),
    days: int = 825,
    not_before: dt.datetime | None = None,
    out: Path | None = None,
) -> Issued:
    """Issue `name`'s certificate for `role`, signed by the CA in `directory`.

    With `out`, the certificate and key go there under the names the packaged configurations read
    (`INSTALLED_STEM`: agent.pem, controller.pem, shadowctl.pem and their .key) with a copy of the CA
    certificate as ca.pem: a directory whose files are copied to /etc/shadowplane/tls/ as they are (or that
    directory itself). Without it they go beside the CA as `<role>-<name>.pem|.key`, for labs and tests that
    keep every party's files in one directory.
    """
    if role not in ROLES:
        raise PkiError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_names(name, role, sans)
    ca_copy = None if out is None else _ca_destination(directory, out)
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError:
        raise PkiError(f"no CA in {directory}: run `shadowctl certs init --dir {directory}` first") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key is not an EC key made by shadowctl certs init")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    if role in ROLE_SAN:
        names.append(x509.DNSName(ROLE_SAN[role]))
    for s in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            names.append(x509.DNSName(s))
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [] if role == "operator" else [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    if out is None:
        cert_path, key_path = directory / f"{role}-{name}.pem", directory / f"{role}-{name}.key"
    else:
        if not out.exists():
            out.mkdir(mode=0o700, parents=True)  # it will hold a private key
        cert_path, key_path = out / f"{INSTALLED_STEM[role]}.pem", out / f"{INSTALLED_STEM[role]}.key"
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    if ca_copy is not None:
        _write_public(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, None if out is None else out / "ca.pem")


def _ca_destination(directory: Path, out: Path) -> Path | None:
    """Where the CA certificate is copied for a bundle in `out` (None: it is there already). A different CA
    certificate there is refused: the host would then trust one fleet and present another's certificate."""
    target = out / "ca.pem"
    try:
        ours = (directory / "ca.pem").read_bytes()
    except FileNotFoundError:
        raise PkiError(f"no CA in {directory}: run `shadowctl certs init --dir {directory}` first") from None
    if not target.exists():
        return target
    if target.read_bytes() == ours:
        return None
    raise PkiError(
        f"{target} is another CA's certificate than {directory / 'ca.pem'}: the host would trust one fleet "
        f"and present another's certificate; issue from that CA (--dir), or remove {target} if it is stale"
    )


@dataclass(frozen=True)
class Identity:
    name: str
    role: str


@functools.lru_cache(maxsize=65_536)
def identity_from_pem(pem: bytes) -> Identity:
    """The name and role in a (verified) certificate. Cached by its bytes: every lease renewal asks it of
    the same few certificates, and parsing one is most of a renewal's cost at fleet sizes."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return Identity(str(cn[0].value) if cn else "", str(ou[0].value) if ou else "")
