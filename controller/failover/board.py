"""What every observer last said about each service: health of each target, and lease renewals."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shadowplane.v1 import agent_pb2 as apb


@dataclass(frozen=True)
class View:
    up: bool | None  # None: the observer cannot check the target (detail says why)
    detail: str
    since_ms: int
    received: float  # monotonic
    token: int = 0
    target: str = ""


class ObservationBoard:
    def __init__(self) -> None:
        self._health: dict[tuple[str, str, str], View] = {}  # (service, observer, target)
        self._lease: dict[tuple[str, str], View] = {}  # (service, observer) -> view of the holder

    def put(self, observer: str, o: apb.Observation) -> View | None:
        """Record an observation; return the previous view (None if there was none)."""
        up = None if o.unknown and o.kind != "lease" else o.up
        view = View(up, o.detail, o.since_unix_ms, time.monotonic(), o.token, o.target)
        if o.kind == "lease":
            key2 = (o.service, observer)
            prev = self._lease.get(key2)
            self._lease[key2] = view
            return prev
        key3 = (o.service, observer, o.target)
        prev = self._health.get(key3)
        self._health[key3] = view
        return prev

    def forget_observer(self, observer: str) -> None:
        """An observer that left knows nothing any more."""
        self._health = {k: v for k, v in self._health.items() if k[1] != observer}
        self._lease = {k: v for k, v in self._lease.items() if k[1] != observer}

    def health(self, service: str, target: str) -> dict[str, View]:
        return {k[1]: v for k, v in self._health.items() if k[0] == service and k[2] == target}

    def lease(self, service: str) -> dict[str, View]:
        return {k[1]: v for k, v in self._lease.items() if k[0] == service}
