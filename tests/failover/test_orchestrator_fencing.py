"""The coordinator's fencing waits, with the real orchestrator, HA loop, registry, store and observers.

The agents are simulated at the stream's edge (commands in, results out), each answering votes with the
real observer (agentd.failover.ObserverRole): what the agent's code would answer, without a host to run it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from agentd.failover import ObserverRole
from controller.config import ControllerConfig, load_controller_config
from controller.event_log import EventLog
from controller.failover.decide import Decision
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry, AgentSession
from controller.store import ServiceRecord
from controller.store.sqlite import SqliteStore
from shadowplane.clock import now_ms
from shadowplane.lease import address_expiry_seconds
from shadowplane.v1 import agent_pb2 as apb

LEASE = 0.25
CONFIG = f"""
listen = "127.0.0.1:7400"
[tls]
plaintext = true
[failover]
lease_seconds = {LEASE}
renew_interval_seconds = 0.05
[[service]]
name = "web"
primary = "p1"
shadows = ["s1", "s2"]
vip = "10.77.0.100/24"
[[host]]
name = "p1"
address = "10.77.0.11"
[[host]]
name = "s1"
address = "10.77.0.21"
[[host]]
name = "s2"
address = "10.77.0.22"
"""


class FakeAgent:
    """One host's end of the agent stream: votes from a real observer, acquire/release/hooks answered."""

    def __init__(self, registry: AgentRegistry, host: str, answers_release: bool = True) -> None:
        self.host, self.answers_release = host, answers_release
        self.role = ObserverRole(host, report=lambda m: None)
        self.role.leases.started_at -= 10  # running for a while
        self.role.leases.observe(["web"], LEASE)
        self.instance = 0
        self.registry = registry
        self.task: asyncio.Task[None] | None = None
        self.connect()

    def connect(self) -> None:
        """A (re)start of the agent: a new instance on the stream."""
        self.instance += 1
        self.session = AgentSession(
            self.host, f"{self.host}-{self.instance}", "peer", apb.Hello(host=self.host), now_ms(), now_ms()
        )
        self.registry.attach(self.session)
        if self.task is not None:
            self.task.cancel()
        self.task = asyncio.create_task(self._serve(self.session))

    async def _serve(self, session: AgentSession) -> None:
        while True:
            msg = await session.outbox.get()
            session.last_heard_ms = now_ms()
            cmd = msg.command
            kind = cmd.WhichOneof("action")
            r = apb.CommandResult(command_id=cmd.command_id, ok=True, incarnation=cmd.incarnation)
            if kind == "vote":
                r.vote.CopyFrom(self.role.vote(cmd.vote))
            elif kind == "watch":
                self.role.leases.observe(cmd.watch.observed_services, cmd.watch.lease_ms / 1000)
                continue
            elif kind == "acquire":
                r.address.CopyFrom(
                    apb.AddressState(service="web", token=cmd.acquire.token, holds_address=True)
                )
            elif kind == "release":
                if not self.answers_release:
                    continue  # hung: it never answers
                r.address.CopyFrom(
                    apb.AddressState(service="web", token=cmd.release.token, holds_address=False)
                )
            elif kind == "run_hook":
                r.hook.CopyFrom(apb.HookResult(phase=cmd.run_hook.phase, found=False))
            problem = self.registry.resolve(session, r)
            assert problem is None, problem


async def setup(
    tmp_path: Path,
) -> tuple[ControllerConfig, SqliteStore, AgentRegistry, EventLog, Orchestrator]:
    cfg_path = tmp_path / "controller.toml"
    cfg_path.write_text(CONFIG)
    cfg = load_controller_config(cfg_path)
    store = SqliteStore(tmp_path / "c.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    observer.started_at -= 10
    orch = Orchestrator(cfg, store, registry, events, observer)
    return cfg, store, registry, events, orch


def p1_owns_token_1(orch: Orchestrator, agents: list[FakeAgent], renew_now: bool) -> None:
    orch.store.save_service_state(ServiceRecord("web", owner="p1", token=1, phase="stable"))
    assert orch.observer.vote("web", 1, "p1").granted
    for a in agents:
        assert a.role.vote(apb.Vote(service="web", token=1, candidate="p1")).granted
    if renew_now:  # p1 renewed a moment ago with everyone
        assert orch.observer.renew("web", 1, "p1").granted
        for a in agents:
            assert a.role.leases.renew("web", 1, "p1").granted


def completion(store: SqliteStore) -> dict[str, object]:
    done = [e for e in store.events("web") if e.kind.endswith("-complete")]
    assert done, [f"{e.kind}: {e.reason}" for e in store.events("web")]
    return dict(done[-1].detail)


def run(tmp_path: Path, body: Callable[..., object]) -> object:
    async def main() -> object:
        cfg, store, registry, events, orch = await setup(tmp_path)
        try:
            return await body(cfg, store, registry, events, orch)  # type: ignore[misc]
        finally:
            store.close()

    return asyncio.run(main())


def test_an_owner_that_does_not_confirm_is_presumed_to_hold_its_address_until_its_lifetime_ends(
    tmp_path: Path,
) -> None:
    async def body(cfg, store, registry, events, orch):  # type: ignore[no-untyped-def]
        p1 = FakeAgent(registry, "p1", answers_release=False)  # connected, but hung: its service died too
        agents = [FakeAgent(registry, "s1"), FakeAgent(registry, "s2")]
        p1_owns_token_1(orch, agents, renew_now=True)
        await orch.run(cfg.service[0], Decision("failover", "s1", "owner p1 is down", planned=True))
        p1.task.cancel()
        return completion(store)

    detail = run(tmp_path, body)
    assert str(detail["released"]) == "False"  # event details are stored as text
    # the wait covers p1's last lease and then its address's kernel lifetime and check
    assert int(str(detail["waited_ms"])) >= (LEASE + address_expiry_seconds(LEASE)) * 1000 - 100, detail


def test_a_confirmed_release_needs_no_wait(tmp_path: Path) -> None:
    async def body(cfg, store, registry, events, orch):  # type: ignore[no-untyped-def]
        FakeAgent(registry, "p1", answers_release=True)  # its service died; its agent let go at once
        agents = [FakeAgent(registry, "s1"), FakeAgent(registry, "s2")]
        p1_owns_token_1(orch, agents, renew_now=True)
        await orch.run(cfg.service[0], Decision("failover", "s1", "owner p1 is down", planned=True))
        return completion(store)

    detail = run(tmp_path, body)
    assert (str(detail["released"]), str(detail["waited_ms"])) == ("True", "0"), detail


def test_the_ha_loop_brings_a_restarted_observer_up_to_the_owners_token(tmp_path: Path) -> None:
    async def body(cfg, store, registry, events, orch):  # type: ignore[no-untyped-def]
        p1 = FakeAgent(registry, "p1")
        s1, s2 = FakeAgent(registry, "s1"), FakeAgent(registry, "s2")
        p1_owns_token_1(orch, [s1, s2], renew_now=False)
        loop = FailoverLoop(cfg, store, registry, events, orch.observer, orch)
        # s2's agent restarts: it forgot its vote, so it would refuse p1's renewals of token 1 for good
        s2.role = ObserverRole("s2", report=lambda m: None)
        s2.role.leases.started_at -= 10
        s2.role.leases.observe(["web"], LEASE)
        s2.connect()
        assert not s2.role.leases.renew("web", 1, "p1").granted
        loop.tick()
        for _ in range(100):
            await asyncio.sleep(0.01)
            st = s2.role.leases.state("web")
            if st is not None and st.promised == 1:
                break
        granted = s2.role.leases.renew("web", 1, "p1").granted
        # a rogue renewal still changes nothing at the caught-up observer
        rogue = s2.role.leases.renew("web", 2**62, "s2")
        for t in [loop._tasks, [p1.task, s1.task, s2.task]]:
            for task in t:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        return granted, rogue.granted, s2.role.leases.state("web")

    granted, rogue, state = run(tmp_path, body)  # type: ignore[misc]
    assert granted, "the caught-up observer grants the owner's renewals again"
    assert not rogue and state.promised == 1 and state.holder == "p1"


def test_observers_that_promised_a_newer_token_set_where_the_next_placement_starts(tmp_path: Path) -> None:
    """A store that starts again from scratch (new replicas on an empty etcd, a restored backup) holds a
    token below the ones the observers promised: they refuse it. The next placement starts above the
    newest token they name, rather than counting up one refusal at a time, and succeeds."""

    async def body(cfg, store, registry, events, orch):  # type: ignore[no-untyped-def]
        FakeAgent(registry, "p1")
        agents = [FakeAgent(registry, "s1"), FakeAgent(registry, "s2")]
        for a in agents:
            assert a.role.vote(apb.Vote(service="web", token=57, candidate="p1")).granted
        first = await orch.run(cfg.service[0], Decision("place", "p1", "no owner", planned=True))
        second = await orch.run(cfg.service[0], Decision("place", "p1", "no owner", planned=True))
        return first, second

    first, second = run(tmp_path, body)  # type: ignore[misc]
    assert (first.phase, first.token) == ("no-owner", 57), first
    assert (second.owner, second.phase, second.token) == ("p1", "stable", 58), second
