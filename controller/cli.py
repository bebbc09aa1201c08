"""`shadowplane-controller`: the Shadowplane controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from controller.config import ControllerConfig, load_controller_config
from controller.server import start
from shadowplane import logs, sdnotify
from shadowplane.config import ConfigError

DEFAULT_CONFIG = "/etc/shadowplane/controller.toml"
log = logging.getLogger(__name__)


async def serve(cfg: ControllerConfig) -> None:
    c = await start(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def status_line() -> str:
        return (
            f"listening on {cfg.listen} (port {c.port}), {len(c.registry.connected())} agents connected, "
            f"{len(cfg.service)} services"
        )

    # systemd (Type=notify): ready once the port listens; the watchdog pings from this loop.
    helpers = [
        asyncio.create_task(sdnotify.watchdog_task()),
        asyncio.create_task(sdnotify.status_task(status_line)),
    ]
    sdnotify.ready(status_line())
    try:
        await stop.wait()
        log.info("controller stopping")
    finally:
        sdnotify.stopping("stopping")
        for t in helpers:
            t.cancel()
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
    if args.cmd == "check-config":
        print(f"{path}: ok")
        return 0
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
