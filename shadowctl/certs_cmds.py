"""`shadowctl certs init|issue`: a CA and certificates for a fleet that has none."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from shadowplane.pki import ROLES, PkiError, Role, init_ca, issue


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("certs", help="make a fleet CA and host / operator certificates")
    certs = p.add_subparsers(dest="certs_cmd", required=True, metavar="ACTION")
    i = certs.add_parser("init", help="create the fleet CA (ca.pem, ca.key) in --dir")
    i.add_argument("--dir", type=Path, default=Path("/etc/shadowplane/tls"))
    i.add_argument("--days", type=int, default=3650)
    i.set_defaults(func=init)
    s = certs.add_parser(
        "issue", help="issue a certificate for a host (agent), the controller or an operator"
    )
    s.add_argument("name", help="host name (an agent's `host` in agentd.toml), or a person's or tool's name")
    s.add_argument("--role", choices=ROLES, default="agent")
    s.add_argument("--san", action="append", default=[], help="extra DNS name or IP for the certificate")
    s.add_argument("--dir", type=Path, default=Path("/etc/shadowplane/tls"))
    s.add_argument("--days", type=int, default=825)
    s.set_defaults(func=issue_cmd)


def init(args: argparse.Namespace) -> int:
    try:
        ca = init_ca(args.dir, days=args.days)
    except PkiError as e:
        print(f"shadowctl certs init: {e}", file=sys.stderr)
        return 1
    print(f"CA certificate {ca.cert}\nCA key         {ca.key}")
    # Whoever has the CA key can issue a controller or operator certificate and take the fleet over: it
    # must not stay on a host the fleet runs on.
    print(
        f"shadowctl certs init: warning: {ca.key} can sign certificates for any host, the controller and "
        "operators: it belongs off the hosts. After issuing the certificates, move it to an offline place "
        "(e.g. an encrypted USB key in a safe) and keep only ca.pem on the hosts.",
        file=sys.stderr,
    )
    return 0


def issue_cmd(args: argparse.Namespace) -> int:
    try:
        out = issue(args.dir, args.name, cast(Role, args.role), tuple(args.san), days=args.days)
    except PkiError as e:
        print(f"shadowctl certs issue: {e}", file=sys.stderr)
        return 1
    print(f"{args.role} certificate {out.cert}\n{args.role} key         {out.key}")
    return 0
