"""A service without shadows (a one-host trial): the real HA loop, store, registry and the controller's own
health check see its primary down, and nothing is moved; the decision says why. The primary's agent is
simulated at the stream's edge (tests/failover/test_orchestrator_fencing.FakeAgent): no host runs here."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from controller.config import load_controller_config
from controller.event_log import EventLog
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry
from controller.store import ServiceRecord
from controller.store.sqlite import SqliteStore
from lab.procs import free_port
from tests.failover.test_orchestrator_fencing import FakeAgent

CONFIG = """
listen = "127.0.0.1:7400"
[tls]
plaintext = true
[[host]]
name = "p1"
address = "127.0.0.1"
[[service]]
name = "web"
primary = "p1"
[service.health]
port = {port}
interval_seconds = 0.05
timeout_seconds = 0.05
fall = 2
"""


def test_a_primary_without_shadows_that_goes_down_stays_put_and_the_reason_is_recorded(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[list[tuple[str, str]], ServiceRecord | None]:
        (tmp_path / "controller.toml").write_text(CONFIG.format(port=free_port()))  # nothing listens: down
        cfg = load_controller_config(tmp_path / "controller.toml")
        store = SqliteStore(tmp_path / "c.db")
        registry, events = AgentRegistry(), EventLog(store)
        observer = controller_lease_observer(cfg, store)
        observer.started_at -= 10
        orch = Orchestrator(cfg, store, registry, events, observer)
        p1 = FakeAgent(registry, "p1")
        store.save_service_state(ServiceRecord("web", owner="p1", token=1, phase="stable"))
        assert observer.vote("web", 1, "p1").granted
        loop = FailoverLoop(cfg, store, registry, events, observer, orch)
        task = asyncio.create_task(loop.run())
        try:
            for _ in range(600):  # until the loop has judged p1 down (at most 30 s)
                await asyncio.sleep(0.05)
                if any("is down" in e.reason for e in store.events("web")):
                    break
            await asyncio.sleep(0.5)  # and a few more ticks, in which nothing may start
            return [(e.kind, e.reason) for e in store.events("web")], store.service_state("web")
        finally:
            task.cancel()
            for t in (task, p1.task):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t
            store.close()

    recorded, state = asyncio.run(scenario())
    down = [r for k, r in recorded if k == "decision" and "owner p1 is down" in r]
    assert down and down[0].endswith("no shadow: failover disabled (service.shadows is empty)"), recorded
    assert {k for k, _ in recorded} <= {"decision", "health"}, f"no transition started: {recorded}"
    assert state is not None and (state.owner, state.token) == ("p1", 1)
