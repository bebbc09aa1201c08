"""Connecting to the controller's fleet API, over mutual TLS unless --plaintext is asked for."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

from shadowplane.tls import TlsConfig, sync_channel
from shadowplane.v1 import fleet_pb2_grpc as fgrpc

DEFAULT_CONTROLLER = "127.0.0.1:7400"
DEFAULT_TLS_DIR = Path("/etc/shadowplane/tls")
# The names `shadowctl certs issue --role operator` gives an operator's files (shadowplane/pki.py).
DEFAULT_CA, DEFAULT_CERT, DEFAULT_KEY = (
    DEFAULT_TLS_DIR / n for n in ("ca.pem", "shadowctl.pem", "shadowctl.key")
)


class ClientError(RuntimeError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--controller", help="controller HOST:PORT (default: $SHADOWCTL_CONTROLLER or 127.0.0.1:7400)"
    )
    p.add_argument("--ca", help=f"fleet CA (default: $SHADOWCTL_CA or {DEFAULT_CA})")
    p.add_argument("--cert", help=f"your certificate (default: $SHADOWCTL_CERT or {DEFAULT_CERT})")
    p.add_argument("--key", help=f"your key (default: $SHADOWCTL_KEY or {DEFAULT_KEY})")
    p.add_argument(
        "--plaintext",
        action="store_true",
        default=os.environ.get("SHADOWCTL_PLAINTEXT") == "1",
        help="no TLS (only for a controller started with tls.plaintext = true; $SHADOWCTL_PLAINTEXT=1)",
    )


def controller_address(arg: str | None) -> str:
    return arg or os.environ.get("SHADOWCTL_CONTROLLER") or DEFAULT_CONTROLLER


def tls_config(args: argparse.Namespace) -> TlsConfig:
    if getattr(args, "plaintext", False):
        return TlsConfig(plaintext=True)
    paths = {
        "ca": args.ca or os.environ.get("SHADOWCTL_CA") or str(DEFAULT_CA),
        "cert": args.cert or os.environ.get("SHADOWCTL_CERT") or str(DEFAULT_CERT),
        "key": args.key or os.environ.get("SHADOWCTL_KEY") or str(DEFAULT_KEY),
    }
    missing = [f"--{k} {v}" for k, v in paths.items() if not Path(v).exists()]
    if missing:
        raise ClientError(
            f"no TLS credentials ({', '.join(missing)} not found): pass --ca/--cert/--key (an operator "
            "certificate: `shadowctl certs issue NAME --role operator`), or --plaintext for a test controller"
        )
    return TlsConfig(ca=Path(paths["ca"]), cert=Path(paths["cert"]), key=Path(paths["key"]))


def fleet(args: argparse.Namespace) -> tuple[grpc.Channel, fgrpc.FleetStub]:
    channel = sync_channel(controller_address(args.controller), tls_config(args))
    return channel, fgrpc.FleetStub(channel)


def describe_rpc_error(e: grpc.RpcError, address: str) -> str:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"controller at {address} is unreachable ({details}); is shadowplane-controller running, "
            "and do its TLS settings match yours?"
        )
    name = code.name if code is not None else "error"
    return f"{name}: {details}"
