"""`shadowctl certs init|issue`: a CA and certificates for a fleet that has none.

`issue` writes each party's files under the names the packaged configurations read (agent.pem, controller.pem,
shadowctl.pem, their .key, and ca.pem): into a bundle directory `<CA dir>/<name>/` whose files are copied to
/etc/shadowplane/tls/ on that host as they are, or, with --install, straight into this host's
/etc/shadowplane/tls/ (a one-host trial, or issuing on the host itself).
"""

from __future__ import annotations

import argparse
import grp
import os
import sys
from pathlib import Path
from typing import cast

from shadowplane.pki import ROLES, Issued, PkiError, Role, init_ca, issue

TLS_DIR = Path("/etc/shadowplane/tls")  # where the packaged configurations and shadowctl look
CONTROLLER_GROUP = "shadowplane"  # the packaged controller's user and group (its unit runs as them)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("certs", help="make a fleet CA and host / operator certificates")
    certs = p.add_subparsers(dest="certs_cmd", required=True, metavar="ACTION")
    i = certs.add_parser("init", help="create the fleet CA (ca.pem, ca.key) in --dir")
    i.add_argument("--dir", type=Path, default=TLS_DIR)
    i.add_argument("--days", type=int, default=3650)
    i.set_defaults(func=init)
    s = certs.add_parser(
        "issue",
        help="issue a certificate for a host (agent), the controller or an operator",
        description="Writes ca.pem and, by role, agent.pem/.key, controller.pem/.key or shadowctl.pem/.key "
        "(the names the packaged configurations and shadowctl read) into DIR/NAME/, or with --install into "
        f"{TLS_DIR}/ on this host.",
    )
    s.add_argument("name", help="host name (an agent's `host` in agentd.toml), or a person's or tool's name")
    s.add_argument("--role", choices=ROLES, default="agent")
    s.add_argument("--san", action="append", default=[], help="extra DNS name or IP for the certificate")
    s.add_argument("--dir", type=Path, default=TLS_DIR, help=f"the CA's directory (default {TLS_DIR})")
    s.add_argument("--days", type=int, default=825)
    where = s.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, help="write the files into this directory (default: DIR/NAME/, a bundle to copy)"
    )
    where.add_argument(
        "--install",
        action="store_true",
        help=f"write them into {TLS_DIR}/ on this host, where the packaged configurations read them",
    )
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
    role = cast(Role, args.role)
    out: Path = TLS_DIR if args.install else args.out or args.dir / args.name
    if args.install and not TLS_DIR.exists():
        # Not the 0700 of a bundle: the controller runs as its own user and reads its files here.
        TLS_DIR.mkdir(parents=True)
        TLS_DIR.chmod(0o755)  # whatever the umask
    try:
        issued = issue(args.dir, args.name, role, tuple(args.san), days=args.days, out=out)
    except PkiError as e:
        print(f"shadowctl certs issue: {e}", file=sys.stderr)
        return 1
    print(f"{role} certificate {issued.cert}\n{role} key         {issued.key}\nCA certificate   {issued.ca}")
    group_note = _controller_key_group(issued) if role == "controller" else ""
    if out.resolve() != TLS_DIR.resolve():
        # Their modes matter (the key 0600, the rest readable by the controller's user): copies keep them.
        print(
            f"on the host that runs it, copy them into {TLS_DIR}/ keeping their modes: cp -p {out}/* "
            f"{TLS_DIR}/ (or scp -p {out}/* HOST:{TLS_DIR}/)" + (f"; then {group_note}" if group_note else "")
        )
    elif group_note:
        print(group_note)
    return 0


def _controller_key_group(issued: Issued) -> str:
    """Let the packaged controller (user and group `shadowplane`) read its key, which is written 0600 for
    root: done here when the group exists and we may change it, else said as the command to run."""
    command = f"chgrp {CONTROLLER_GROUP} {TLS_DIR}/controller.key && chmod 0640 {TLS_DIR}/controller.key"
    try:
        gid = grp.getgrnam(CONTROLLER_GROUP).gr_gid
    except KeyError:
        return f"let the controller read its key: {command}"
    if issued.key.parent.resolve() != TLS_DIR.resolve():
        return f"let the controller read its key: {command}"
    try:
        os.chown(issued.key, -1, gid)
        os.chmod(issued.key, 0o640)
    except PermissionError:
        return f"let the controller read its key (as root): {command}"
    return f"{issued.key}: readable by the group {CONTROLLER_GROUP} (the controller's), 0640"
