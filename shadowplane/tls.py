"""Mutual TLS for every gRPC connection: agents <-> controller, agent <-> agent (lease renewals),
shadowctl -> controller.

A [tls] section names the fleet CA and this party's certificate and key. Without one, a daemon refuses to
start unless `plaintext = true` is set explicitly (and then it says so, loudly, once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shadowplane.config import check
from shadowplane.pki import ROLE_SAN, Identity, identity_from_pem

log = logging.getLogger(__name__)


class TlsError(RuntimeError):
    pass


@dataclass
class TlsConfig:
    ca: Path | None = field(default=None, metadata=check(doc="the fleet CA certificate (PEM)"))
    cert: Path | None = field(default=None, metadata=check(doc="this party's certificate (PEM)"))
    key: Path | None = field(default=None, metadata=check(doc="this party's private key (PEM)"))
    plaintext: bool = field(
        default=False, metadata=check(doc="no TLS at all: only for tests and labs; every connection is open")
    )

    def validate(self) -> str | None:
        if self.plaintext:
            return None
        missing = [n for n in ("ca", "cert", "key") if getattr(self, n) is None]
        if missing:
            return (
                f"{missing[0]}: TLS needs ca, cert and key (make them with `shadowctl certs init` and "
                "`shadowctl certs issue`), or set plaintext = true for a test setup"
            )
        return None


def _read(path: Path | None, what: str) -> bytes:
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsError(f"tls.{what}: cannot read {path}: {e.strerror}") from None


def warn_plaintext(who: str) -> None:
    log.warning("%s runs WITHOUT TLS (tls.plaintext = true): anyone who can reach it can use it", who)


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials | None:
    if cfg.plaintext:
        return None
    return grpc.ssl_server_credentials(
        [(_read(cfg.key, "key"), _read(cfg.cert, "cert"))],
        root_certificates=_read(cfg.ca, "ca"),
        require_client_auth=True,
    )


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials | None:
    if cfg.plaintext:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.ca, "ca"),
        private_key=_read(cfg.key, "key"),
        certificate_chain=_read(cfg.cert, "cert"),
    )


def add_port(server: grpc.aio.Server, address: str, cfg: TlsConfig) -> int:
    creds = server_credentials(cfg)
    return server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)


def aio_channel(
    target: str,
    cfg: TlsConfig,
    role: str,
    options: Sequence[tuple[str, Any]] = (),
    server_name: str = "",
) -> grpc.aio.Channel:
    """A channel to a server of `role`: its certificate must carry that role's name (any host of the fleet
    presents it), so we need not know every address it may have. With `server_name`, it must carry that
    name instead: one particular host (every agent certificate names its host)."""
    creds = channel_credentials(cfg)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    opts = [*options, ("grpc.ssl_target_name_override", server_name or ROLE_SAN[role])]
    return grpc.aio.secure_channel(target, creds, options=opts)


def sync_channel(target: str, cfg: TlsConfig, role: str = "controller") -> grpc.Channel:
    creds = channel_credentials(cfg)
    if creds is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", ROLE_SAN[role])])


def peer_identity(context: Any) -> Identity | None:
    """Who is calling, from their verified certificate; None on a plaintext connection."""
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert")
    if not pem:
        return None
    return identity_from_pem(pem[0])


def check_renewer(who: Identity | None, holder: str) -> str | None:
    """Only a lease's holder may renew it (with TLS: with its own agent certificate)."""
    if who is not None and (who.role != "agent" or who.name != holder):
        return f"certificate {who.name!r} ({who.role}) may not renew a lease held by {holder!r}"
    return None
