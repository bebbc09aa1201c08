"""A small certificate authority for a fleet that has none: `shadowctl certs init|issue`.

Roles live in the certificate's organizational unit: "agent" (a host; its common name is the host name),
"controller", "operator" (a person or tool allowed to change things). Every certificate also names its role
as a DNS SAN (`shadowplane-agent`, `shadowplane-controller`) so a peer can verify it by role without
knowing every host's address.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
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


class PkiError(RuntimeError):
    pass


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


def issue(
    directory: Path,
    name: str,
    role: Role,
    sans: tuple[str, ...] = (),
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> Issued:
    """Issue `name`'s certificate for `role`, signed by the CA in `directory`."""
    if role not in ROLES:
        raise PkiError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
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
    stem = f"{role}-{name}"
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


@dataclass(frozen=True)
class Identity:
    name: str
    role: str


def identity_from_pem(pem: bytes) -> Identity:
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return Identity(str(cn[0].value) if cn else "", str(ou[0].value) if ou else "")
