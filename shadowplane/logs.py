"""Logging set-up shared by the daemons and the CLI."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc's own chatter is not ours to report at info
    logging.getLogger("grpc").setLevel(logging.WARNING)
