"""Zone health (controller/pool/zones.py) and what the HA loop makes of it: a zone with at least
`pool.zone_degraded_share` of its hosts down is degraded, an event says so, and no placement lands there."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.config import load_controller_config
from controller.event_log import EventLog
from controller.failover import loop as loop_module
from controller.failover.decide import Decision
from controller.failover.loop import FailoverLoop, ServiceRuntime, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.pool.zones import degraded_hosts, zone_health
from controller.registry import AgentRegistry, AgentSession
from controller.store.sqlite import SqliteStore
from shadowplane.clock import now_ms
from shadowplane.v1 import agent_pb2 as apb

ZONES = {"a0": "a", "a1": "a", "b0": "b", "b1": "b", "b2": "b", "c0": "c", "solo": ""}


def test_a_zone_is_degraded_from_its_share_of_hosts_down() -> None:
    health = {z.zone: z for z in zone_health(ZONES, {"b0": "gone"}, 0.5)}
    assert not health["b"].degraded and health["b"].reason.startswith("1 of 3 hosts down (degraded at 50%")
    health = {z.zone: z for z in zone_health(ZONES, {"b0": "gone", "b1": "cut off"}, 0.5)}
    assert health["b"].degraded and "2 of 3 hosts down" in health["b"].reason
    assert "b0 (gone)" in health["b"].reason and not health["a"].degraded
    assert set(health) == {"a", "b", "c"}  # a host without a zone is no zone's
    assert degraded_hosts(tuple(health.values())) == dict.fromkeys(("b0", "b1", "b2"), health["b"].reason)
    # the share is the operator's: at 0.7, 2 of 3 is not enough
    assert not {z.zone: z for z in zone_health(ZONES, {"b0": "x", "b1": "y"}, 0.7)}["b"].degraded
    # one host of a zone of two is that host's failure, not the zone's (min_hosts 2); both are
    pair = {"x0": "x", "x1": "x", "one": "y"}
    assert not zone_health(pair, {"x0": "gone"}, 0.5)[0].degraded
    assert zone_health(pair, {"x0": "gone", "x1": "gone"}, 0.5)[0].degraded
    assert zone_health(pair, {"one": "gone"}, 0.5)[1].degraded  # a zone of one: its host
    assert zone_health(pair, {"x0": "gone"}, 0.5, min_hosts=1)[0].degraded


def config_text(zones: bool) -> str:
    out = ['listen = "127.0.0.1:7400"', "[tls]", "plaintext = true"]
    for i, (host, zone) in enumerate(ZONES.items()):
        out += ["[[host]]", f'name = "{host}"', f'address = "127.0.9.{i + 1}"']
        if zones and zone:
            out.append(f'zone = "{zone}"')
    out += ["[[service]]", 'name = "web"', 'primary = "b0"', 'shadows = ["b2", "c0"]', 'vip = "10.99.0.1/24"']
    return "\n".join(out) + "\n"


def run_tick(tmp_path: Path, zones: bool) -> tuple[list[tuple[str, str, str]], FailoverLoop, SqliteStore]:
    (tmp_path / "controller.toml").write_text(config_text(zones))
    cfg = load_controller_config(tmp_path / "controller.toml")
    store = SqliteStore(tmp_path / f"c{zones}.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    loop = FailoverLoop(
        cfg, store, registry, events, observer, Orchestrator(cfg, store, registry, events, observer)
    )
    for h in ("a0", "a1", "b2", "c0", "solo"):  # b0 and b1 are gone: 2 of zone b's 3
        registry.attach(AgentSession(h, f"{h}-1", "peer", apb.Hello(host=h), now_ms(), now_ms()))
    for target in ("b2", "c0"):  # the controller's own checks: the shadows' service is up
        loop._checks.setdefault(("web", target), loop_module.Tracker(1, 1)).up = True
        seen = apb.Observation(service="web", target=target, kind="health", up=True)
        loop.board.put("c0" if target == "b2" else "b2", seen)
    loop.started -= 3600  # past the placement grace
    started: list[tuple[str, str, str]] = []

    def noted(rt: ServiceRuntime, d: Decision) -> None:
        started.append((rt.cfg.name, d.action, d.target))

    loop._start = noted  # type: ignore[method-assign]

    async def go() -> None:
        loop.tick()

    asyncio.run(go())
    return started, loop, store


def test_the_ha_loop_places_outside_a_degraded_zone_and_says_why(tmp_path: Path) -> None:
    # without zones, the first ready shadow in the list
    started, _, _ = run_tick(tmp_path, zones=False)
    assert started == [("web", "place", "b2")]
    started, loop, store = run_tick(tmp_path, zones=True)
    assert started == [("web", "place", "c0")]
    assert set(loop.degraded) == {"b0", "b1", "b2"}
    degraded = [e for e in store.events() if e.kind == "zone-degraded"]
    assert len(degraded) == 1 and degraded[0].detail["zone"] == "b"
    assert (
        "2 of 3 hosts down" in degraded[0].reason and "b0 (its agent is not heard from)" in degraded[0].reason
    )
    loop.tick()  # nothing changed: no second event
    assert len([e for e in store.events() if e.kind == "zone-degraded"]) == 1


def test_a_zone_holding_too_many_observers_is_named() -> None:
    from controller.pool.report import zone_quorum_problem

    zone = {"p1": "az1", "s1": "az1", "s2": "az2", "s3": "az3", "s4": "az1"}
    hosts = ["p1", "s1", "s2", "s3", "s4"]
    # the default observers (the controller and every shadow): az1 holds s1 and s4, 2 of 5; with them cut,
    # s2 has 2 of its 4 other observers up, s3 the same: no majority, nothing moves
    problem = zone_quorum_problem(["controller", "s1", "s2", "s3", "s4"], hosts, zone)
    assert problem and problem.startswith("zone az1 holds 2 of its 5 observers")
    # one observer per zone: any zone's failure leaves a majority for a host elsewhere
    assert zone_quorum_problem(["controller", "s2", "s3"], hosts, zone) is None
    # a service whose hosts are all in the failed zone has nowhere to go anyway: not this problem
    assert zone_quorum_problem(["controller", "s1"], ["p1", "s1"], zone) is None
