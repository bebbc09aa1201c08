"""`shadowctl`: the operator's command line for a Shadowplane fleet."""

from __future__ import annotations

import argparse
import sys

import grpc

from shadowctl import certs_cmds, failover_cmds, fleet_cmds, pool_cmds, scaling_cmds, training_cmds
from shadowctl.client import ClientError, add_arguments, controller_address, describe_rpc_error
from shadowplane import logs

# Each command module adds its subcommands; they set `func(args) -> int`.
COMMAND_MODULES = [fleet_cmds, failover_cmds, scaling_cmds, pool_cmds, certs_cmds, training_cmds]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadowctl", description=__doc__)
    add_arguments(p)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the controller")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for m in COMMAND_MODULES:
        m.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level)
    try:
        return int(args.func(args))
    except ClientError as e:
        print(f"shadowctl: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:  # every command talks to the controller: one place says what went wrong
        print(f"shadowctl: {describe_rpc_error(e, controller_address(args.controller))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
