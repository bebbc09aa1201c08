"""The controller's TOML configuration (/etc/shadowplane/controller.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agentd.config import valid_name
from shadowplane.config import at_least, between, check, host_port, load, positive


@dataclass
class StoreConfig:
    path: Path = field(
        default=Path("/var/lib/shadowplane/controller.db"), metadata=check(doc="SQLite database file")
    )
    retention_hours: float = field(
        default=168.0, metadata=check(positive, doc="telemetry older than this is deleted")
    )


@dataclass
class HostEntry:
    name: str = field(metadata=check(valid_name, doc="host name, as its agent reports it"))
    zone: str = field(default="", metadata=check(doc="availability zone"))


@dataclass
class ControllerConfig:
    listen: str = field(default="0.0.0.0:7400", metadata=check(host_port, doc="gRPC listen HOST:PORT"))
    max_message_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=check(between(64 * 1024, 256 * 1024 * 1024), doc="largest message accepted from anyone"),
    )
    stale_after_intervals: float = field(
        default=3.0,
        metadata=check(at_least(1), doc="a host with no telemetry for this many intervals is stale"),
    )
    store: StoreConfig = field(default_factory=StoreConfig)
    host: list[HostEntry] = field(
        default_factory=list,
        metadata=check(doc="[[host]] tables: the fleet. Empty = accept any agent (development only)"),
    )

    def validate(self) -> str | None:
        names = [h.name for h in self.host]
        for n in names:
            if names.count(n) > 1:
                return f"host: {n!r} is listed twice"
        return None


def load_controller_config(path: str | Path) -> ControllerConfig:
    return load(ControllerConfig, path)
