"""What observers last said, as the HA loop reads it: per service and target, per service's lease; an
observer that leaves is forgotten everywhere; a service's views never leak into another's."""

from __future__ import annotations

from controller.failover.board import ObservationBoard
from shadowplane.v1 import agent_pb2 as apb


def health(service: str, target: str, up: bool, detail: str = "") -> apb.Observation:
    return apb.Observation(service=service, target=target, kind="health", up=up, detail=detail)


def test_views_are_per_service_and_target_and_the_latest_wins() -> None:
    b = ObservationBoard()
    assert b.put("s1", health("web", "p1", True)) is None
    b.put("s2", health("web", "p1", False, "timeout"))
    b.put("s1", health("web", "s2", True))
    b.put("s1", health("db", "p1", False))  # same target name, another service
    prev = b.put("s1", health("web", "p1", False, "refused"))
    assert prev is not None and prev.up is True, "the previous view is returned"
    web_p1 = b.health("web", "p1")
    assert {o: (v.up, v.detail) for o, v in web_p1.items()} == {
        "s1": (False, "refused"),
        "s2": (False, "timeout"),
    }
    assert set(b.health("db", "p1")) == {"s1"} and set(b.health("web", "s2")) == {"s1"}
    assert b.health("web", "nobody") == {}
    web_p1.clear()  # a caller's copy: the board is not changed through it
    assert set(b.health("web", "p1")) == {"s1", "s2"}


def test_lease_views_and_unknown_health() -> None:
    b = ObservationBoard()
    b.put("s1", apb.Observation(service="web", target="p1", kind="lease", up=True, token=4))
    b.put("s2", apb.Observation(service="web", target="p1", kind="health", unknown=True, detail="no route"))
    lease = b.lease("web")
    assert (lease["s1"].up, lease["s1"].token, lease["s1"].target) == (True, 4, "p1")
    assert b.lease("db") == {}
    assert b.health("web", "p1")["s2"].up is None, "an observer that cannot check says so"


def test_an_observer_that_leaves_is_forgotten_everywhere() -> None:
    b = ObservationBoard()
    for svc in ("web", "db"):
        b.put("s1", health(svc, "p1", True))
        b.put("s2", health(svc, "p1", True))
        b.put("s1", apb.Observation(service=svc, target="p1", kind="lease", up=True, token=1))
    b.forget_observer("s1")
    assert set(b.health("web", "p1")) == {"s2"} and set(b.health("db", "p1")) == {"s2"}
    assert b.lease("web") == {} and b.lease("db") == {}
