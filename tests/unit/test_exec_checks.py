"""Exec health checks are configured on the host that runs them: the controller names a check, an observer
runs only the command of its own `[checks.NAME]`, and one without that check says so instead of running
anything."""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from pathlib import Path

import pytest

from agentd.config import load_agent_config
from agentd.failover import ObserverRole
from controller.config import ControllerConfig, HostEntry, ServiceConfig, load_controller_config
from controller.event_log import EventLog
from controller.failover.loop import FailoverLoop, controller_lease_observer
from controller.failover.orchestrator import Orchestrator
from controller.registry import AgentRegistry
from controller.store import SqliteStore
from shadowplane.config import ConfigError, build
from shadowplane.healthcheck import ExecCheckConfig
from shadowplane.v1 import agent_pb2 as apb

CONTROLLER = """
[tls]
plaintext = true
[[host]]
name = "p1"
address = "10.0.0.1"
[[host]]
name = "s1"
address = "10.0.0.2"
[[service]]
name = "web"
primary = "p1"
shadows = ["s1"]
vip = "10.0.0.100/24"
{observers}
[service.health]
kind = "exec"
{health}
{checks}
"""


def controller_toml(tmp_path: Path, health: str, checks: str = "", observers: str = "") -> Path:
    p = tmp_path / "controller.toml"
    p.write_text(CONTROLLER.format(health=health, checks=checks, observers=observers))
    return p


def test_controller_refuses_a_command_line_and_names_the_new_form(tmp_path: Path) -> None:
    path = controller_toml(tmp_path, 'command = ["/usr/local/bin/check-web"]')
    with pytest.raises(ConfigError) as e:
        load_controller_config(path)
    assert e.value.field == "service[0].health.command"
    assert 'check = "NAME"' in e.value.problem and "[checks.NAME]" in e.value.problem
    assert "agentd.toml" in e.value.problem


def test_controller_needs_the_named_check_only_when_it_observes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_controller_config(controller_toml(tmp_path, 'check = "web-ok"'))
    assert e.value.field == "service[0].health.check"
    assert (
        "add [checks.web-ok]" in e.value.problem
        and '"controller" out of service.observers' in e.value.problem
    )

    cfg = load_controller_config(
        controller_toml(tmp_path, 'check = "web-ok"', '[checks.web-ok]\ncommand = ["/bin/true"]')
    )
    assert cfg.checks["web-ok"].command == ["/bin/true"]
    # Observed by the shadow alone: the controller runs nothing, so it needs no such check.
    cfg = load_controller_config(
        controller_toml(tmp_path, 'check = "web-ok"', observers='observers = ["s1"]')
    )
    assert cfg.service[0].health.check == "web-ok" and cfg.checks == {}

    with pytest.raises(ConfigError) as e:
        load_controller_config(controller_toml(tmp_path, ""))
    assert e.value.field == "service[0].health.check" and "[checks.NAME]" in e.value.problem


@pytest.mark.parametrize(
    ("checks", "field", "words"),
    [
        ("[checks.web-ok]\ncommand = []", "checks.web-ok.command", "the program and its arguments"),
        ("[checks.web-ok]\ntimeout = 3\ncommand = ['/bin/true']", "checks.web-ok.timeout", "unknown key"),
        ("[checks.'web ok']\ncommand = ['/bin/true']", "checks.web ok", "the check's name must be"),
    ],
)
def test_agent_checks_are_validated(tmp_path: Path, checks: str, field: str, words: str) -> None:
    p = tmp_path / "agentd.toml"
    p.write_text(f'host = "s1"\n[tls]\nplaintext = true\n{checks}\n')
    with pytest.raises(ConfigError) as e:
        load_agent_config(p)
    assert e.value.field == field and words in e.value.problem


def test_the_watch_carries_only_the_name(tmp_path: Path) -> None:
    secret = "/usr/local/bin/controller-only-check"
    cfg = ControllerConfig(
        host=[HostEntry("p1", address="10.0.0.1"), HostEntry("s1", address="10.0.0.2")],
        service=[
            build(
                ServiceConfig,
                {
                    "name": "web",
                    "primary": "p1",
                    "shadows": ["s1"],
                    "vip": "10.0.0.100/24",
                    "health": {"kind": "exec", "check": "web-ok"},
                },
            )
        ],
        checks={"web-ok": ExecCheckConfig([secret, "--quick"])},
    )
    store = SqliteStore(tmp_path / "c.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    loop = FailoverLoop(
        cfg, store, registry, events, observer, Orchestrator(cfg, store, registry, events, observer)
    )
    watch = loop.watch_for("s1")
    assert [(c.target, c.kind, c.check) for c in watch.checks] == [("p1", "exec", "web-ok")]
    assert secret.encode() not in watch.SerializeToString()

    # An observer that cannot check: the target is unknown to it (not down), and its reason is on record.
    why = "cannot check p1: ... add [checks.web-ok] with its command to /etc/shadowplane/agentd.toml"
    loop.on_observation(
        "s1", apb.Observation(service="web", target="p1", kind="health", unknown=True, up=False, detail=why)
    )
    assert loop.board.health("web", "p1")["s1"].up is None
    assert any(e.kind == "health" and e.reason == f"s1 {why}" for e in store.events(limit=10))


class Observer:
    """A real ObserverRole, as the agent runs it, and the messages it sends to the controller."""

    def __init__(self, tmp_path: Path, checks: dict[str, list[str]]) -> None:
        self.sent: list[apb.AgentMessage] = []
        self.config_file = str(tmp_path / "agentd.toml")
        self.role = ObserverRole(
            "s1",
            self.sent.append,
            {k: ExecCheckConfig(v) for k, v in checks.items()},
            config_file=self.config_file,
        )

    def health(self) -> list[apb.Observation]:
        return [
            m.observation for m in self.sent if m.HasField("observation") and m.observation.kind == "health"
        ]

    async def first_health(self) -> apb.Observation:
        async with asyncio.timeout(30):
            while not self.health():
                await asyncio.sleep(0.01)
        return self.health()[0]


def watch(check: apb.HealthCheck) -> apb.Watch:
    return apb.Watch(checks=[check], observed_services=["web"], lease_ms=1000)


def exec_check(name: str) -> apb.HealthCheck:
    return apb.HealthCheck(
        service="web",
        target="p1",
        address="10.9.9.9",
        kind="exec",
        port=8080,
        check=name,
        interval_ms=20,
        timeout_ms=5000,
        fall=1,
        rise=1,
    )


def test_the_agent_runs_its_own_command_for_the_named_check(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    # a shell, not a Python interpreter: its start (hundreds of ms on a loaded 2-core CI machine) must stay
    # well inside the check's timeout
    script = f'echo "$SHADOWPLANE_TARGET_ADDRESS" >> {seen}'
    obs = Observer(tmp_path, {"web-ok": ["/bin/sh", "-c", script]})

    async def go() -> apb.Observation:
        obs.role.watch(watch(exec_check("web-ok")))
        try:
            return await obs.first_health()
        finally:
            await obs.role.close()

    first = asyncio.run(go())
    assert first.up and not first.unknown and first.target == "p1"
    assert seen.read_text().splitlines()[0] == "10.9.9.9"


def test_the_agent_stops_cleanly_while_a_check_command_is_starting(tmp_path: Path) -> None:
    """An agent stopping (its loop ending) while an exec probe's process is being started must end and leave
    no check process behind: before, such a stop could hang forever (CPython 3.11 waits for a pipe its own
    cancelled task never connected), a hang that systemd ends only by killing the agent."""
    marker = f"{37 + random.random():.6f}"  # this test's own `sleep` argument, to find its processes
    check = exec_check("web-ok")
    check.interval_ms = 2  # a probe starting nearly always, so the stop lands in some process's start

    async def go(delay: float) -> None:
        obs = Observer(tmp_path, {"web-ok": ["/bin/sleep", marker]})  # an agent's run: a role of its own
        obs.role.watch(watch(check))
        await asyncio.sleep(delay)
        await obs.role.close()

    def run(delay: float, ended: threading.Event) -> None:
        asyncio.run(go(delay))
        ended.set()

    for i in range(25):
        ended = threading.Event()
        # in a thread, so that a hang fails this test instead of stopping the suite
        threading.Thread(target=run, args=(0.005 + 0.002 * i, ended), daemon=True).start()
        assert ended.wait(20), f"stop {i}: the agent's loop did not end within 20 s of its checks' close"
        left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout
        assert not left, f"stop {i}: check processes outlived the agent's close: {left.split()}"


def test_an_unknown_check_is_reported_and_nothing_runs(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    obs = Observer(tmp_path, {"other": ["/usr/bin/touch", str(ran)]})
    # What an older controller sent: the argv in field 8, now reserved. It must be ignored, never run.
    old_argv = b"".join(b"\x42" + bytes([len(a)]) + a for a in (b"/usr/bin/touch", str(ran).encode()))
    legacy = apb.HealthCheck.FromString(exec_check("").SerializeToString() + old_argv)

    async def go(c: apb.HealthCheck) -> apb.Observation:
        obs.sent.clear()
        obs.role.watch(watch(c))
        try:
            return await obs.first_health()
        finally:
            await obs.role.close()

    for c, name in [(exec_check("web-ok"), "web-ok"), (legacy, "NAME")]:
        o = asyncio.run(go(c))
        assert o.unknown and o.target == "p1"
        assert f"add [checks.{name}] with its command to {obs.config_file}" in o.detail
        assert not ran.exists(), "nothing the controller named or sent was run"
