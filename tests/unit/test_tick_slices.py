"""The HA tick and the scaling plan run in slices with the event loop free between them (renewals and
timers must not wait for a walk of the whole fleet): slicing must not skip a service, act twice for one,
or act on what it read before the pause."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from controller.config import load_controller_config
from controller.event_log import EventLog
from controller.failover import loop as loop_module
from controller.failover.decide import Decision, Request
from controller.failover.loop import FailoverLoop, ServiceRuntime, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry, AgentSession
from controller.store.sqlite import SqliteStore
from shadowplane.clock import now_ms
from shadowplane.v1 import agent_pb2 as apb

SERVICES = 12


def config_text() -> str:
    out = ['listen = "127.0.0.1:7400"', "[tls]", "plaintext = true"]
    for i in range(SERVICES):
        for role, n in (("p", 1), ("s", 2)):
            out += ["[[host]]", f'name = "{role}{i}"', f'address = "127.0.{i}.{n}"']
    for i in range(SERVICES):
        out += [
            "[[service]]",
            f'name = "svc{i}"',
            f'primary = "p{i}"',
            f'shadows = ["s{i}"]',
            f'vip = "10.99.{i}.1/24"',
        ]
    return "\n".join(out) + "\n"


def make_loop(tmp_path: Path) -> FailoverLoop:
    (tmp_path / "controller.toml").write_text(config_text())
    cfg = load_controller_config(tmp_path / "controller.toml")
    store = SqliteStore(tmp_path / "c.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    loop = FailoverLoop(
        cfg, store, registry, events, observer, Orchestrator(cfg, store, registry, events, observer)
    )
    for svc in cfg.service:  # each shadow, the other observer, sees the primary up
        loop.board.put(
            svc.shadows[0], apb.Observation(service=svc.name, target=svc.primary, kind="health", up=True)
        )
    for h in cfg.host:
        registry.attach(
            AgentSession(h.name, f"{h.name}-1", "peer", apb.Hello(host=h.name), now_ms(), now_ms())
        )
        for svc in cfg.service:  # the controller's own checks say every target is up
            if h.name in (svc.primary, *svc.shadows):
                tracker = loop._checks.setdefault((svc.name, h.name), loop_module.Tracker(1, 1))
                tracker.up = True
    loop.started -= 3600  # past the placement grace
    start = loop._start

    def noted(rt: ServiceRuntime, d: Decision) -> None:  # what was started, as it is started
        loop.started_transitions.append((rt.cfg.name, d.action, d.target))  # type: ignore[attr-defined]
        start(rt, d)

    loop.started_transitions = []  # type: ignore[attr-defined]
    loop._start = noted  # type: ignore[method-assign]
    return loop


def test_a_sliced_tick_places_every_service_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_module, "TICK_SLICE_SECONDS", 0.0)  # a pause after every service

    async def go() -> None:
        loop = make_loop(tmp_path)
        slices = loop._tick_slices()

        def started() -> list[str]:
            return [n for n, rt in loop.services.items() if rt.task is not None]

        while not started():  # the first slices send each new stream its Watch
            next(slices)
        assert started() == ["svc0"]  # then one service per slice
        # between slices an operator moves a service the tick has not reached yet: the tick, reaching it,
        # sees the running transition and starts no second one
        assert loop.request("svc5", Request("failover", to="s5")).accepted
        svc5_task = loop.services["svc5"].task
        counts = [len(started())]
        for _ in slices:
            counts.append(len(started()))
        assert all(b - a <= 1 for a, b in itertools.pairwise(counts))  # every service in a slice of its own
        assert loop.services["svc5"].task is svc5_task
        assert all(rt.task is not None for rt in loop.services.values())  # none skipped
        placed = [s for s, action, _ in loop.started_transitions if action == "place"]  # type: ignore[attr-defined]
        assert sorted(placed) == sorted(f"svc{i}" for i in range(SERVICES) if i != 5)
        for rt in loop.services.values():
            assert rt.task is not None
            rt.task.cancel()
        await asyncio.gather(*(rt.task for rt in loop.services.values() if rt.task), return_exceptions=True)

    asyncio.run(go())


def test_a_whole_tick_and_a_sliced_one_decide_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def decided(slice_seconds: float, d: Path) -> list[tuple[str, str]]:
        monkeypatch.setattr(loop_module, "TICK_SLICE_SECONDS", slice_seconds)
        d.mkdir()
        loop = make_loop(d)
        for _ in loop._tick_slices():
            await asyncio.sleep(0)
        out = sorted((s, target) for s, _, target in loop.started_transitions)  # type: ignore[attr-defined]
        for rt in loop.services.values():
            if rt.task is not None:
                rt.task.cancel()
        await asyncio.gather(*(rt.task for rt in loop.services.values() if rt.task), return_exceptions=True)
        return out

    whole = asyncio.run(decided(60.0, tmp_path / "whole"))
    sliced = asyncio.run(decided(0.0, tmp_path / "sliced"))
    assert whole == sliced == sorted((f"svc{i}", f"p{i}") for i in range(SERVICES))
