"""`shadowplane-controller`: the Shadowplane controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from controller.config import ControllerConfig, load_controller_config
from controller.failover.decide import NO_SHADOW
from controller.server import start
from shadowplane import gc_pauses, logs, sdnotify
from shadowplane.config import ConfigError

DEFAULT_CONFIG = "/etc/shadowplane/controller.toml"
log = logging.getLogger(__name__)


async def serve(cfg: ControllerConfig) -> None:
    c = await start(cfg)
    c.tasks.append(asyncio.create_task(gc_pauses.freeze_forever()))

    def status_line() -> str:
        return (
            f"listening on {cfg.listen} (port {c.port}), {len(c.registry.connected())} agents connected, "
            f"{len(cfg.service)} services"
        )

    try:
        await sdnotify.serve_until_stopped(status_line)
        log.info("controller stopping")
    finally:
        await c.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shadowplane-controller", description=__doc__)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd")
    for name, text in (
        ("run", "run the daemon (the default)"),
        ("check-config", "validate the config and exit"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", default=DEFAULT_CONFIG)
    args = p.parse_args(argv)
    logs.setup(args.log_level)
    path = getattr(args, "config", DEFAULT_CONFIG)
    try:
        cfg = load_controller_config(path)
    except ConfigError as e:
        print(f"shadowplane-controller: bad config: {e}", file=sys.stderr)
        return 2
    watched_only = [s.name for s in cfg.service if not s.shadows]
    quorum_problems = [(s.name, q) for s in cfg.service if (q := s.quorum_problem()) is not None]
    if args.cmd == "check-config":
        print(f"{path}: ok")
        for name in watched_only:
            print(f"service {name}: {NO_SHADOW}: watched and forecast only, nothing moves")
        for name, problem in quorum_problems:
            print(f"service {name}: warning: {problem}")
        return 0
    for name in watched_only:
        log.warning("service %s: %s: watched and forecast only, nothing moves", name, NO_SHADOW)
    for name, problem in quorum_problems:
        log.warning("service %s: %s", name, problem)
    if not cfg.host:
        log.warning(
            "no [[host]] list in %s: accepting any agent (fine for development, not for a fleet)", path
        )
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"shadowplane-controller: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
