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
    """Indexed by what the HA loop asks for (a service's target; a service's lease), so that each question
    costs its observers, not every observation in the fleet (the loop asks it of every service per tick)."""

    def __init__(self) -> None:
        self._health: dict[tuple[str, str], dict[str, View]] = {}  # (service, target) -> observer -> view
        self._lease: dict[str, dict[str, View]] = {}  # service -> observer -> view of the holder

    def put(self, observer: str, o: apb.Observation) -> View | None:
        """Record an observation; return the previous view (None if there was none)."""
        up = None if o.unknown and o.kind != "lease" else o.up
        view = View(up, o.detail, o.since_unix_ms, time.monotonic(), o.token, o.target)
        views = (
            self._lease.setdefault(o.service, {})
            if o.kind == "lease"
            else self._health.setdefault((o.service, o.target), {})
        )
        prev = views.get(observer)
        views[observer] = view
        return prev

    def forget_observer(self, observer: str) -> None:
        """An observer that left knows nothing any more."""
        for views in (*self._health.values(), *self._lease.values()):
            views.pop(observer, None)

    def health(self, service: str, target: str) -> dict[str, View]:
        return dict(self._health.get((service, target), {}))

    def lease(self, service: str) -> dict[str, View]:
        return dict(self._lease.get(service, {}))
