"""The README's "first hour" on a stock Debian 12 host (kernel 6.1, systemd 252, pure cgroup v2): every step
runs in the guest as the README shows it, then what the README says the operator sees is checked."""

from __future__ import annotations

import json

from tests.vm.guest import Guest
from tests.vm.walkthrough import Walk


def test_every_step_of_the_walkthrough_works(walked: Walk) -> None:
    failed = walked.failed()
    assert failed is None, (
        f"README first-hour step failed (exit {failed.result.rc}):\n{failed.script}\n"
        f"--- stdout\n{failed.result.out[-3000:]}\n--- stderr\n{failed.result.err[-3000:]}"
    )
    assert len(walked.steps) == walked.expected_steps


def test_both_units_are_enabled_active_and_ready(walked: Walk, guest: Guest) -> None:
    for unit in ("shadowplane-controller", "shadowplane-agentd"):
        show = guest.run(
            "systemctl", "show", unit, "-p", "ActiveState,SubState,UnitFileState,Type,StatusText,NRestarts"
        ).check()
        props = dict(line.split("=", 1) for line in show.out.splitlines() if "=" in line)
        assert props["ActiveState"] == "active" and props["SubState"] == "running", props
        assert props["UnitFileState"] == "enabled", props
        assert props["Type"] == "notify", props
        assert props["NRestarts"] == "0", f"{unit} restarted during the walkthrough: {props}"
    ctl = guest.run("systemctl", "show", "shadowplane-controller", "-p", "StatusText", "--value").check().out
    assert "listening on" in ctl and "1 agents connected" in ctl, ctl
    agent = guest.run("systemctl", "show", "shadowplane-agentd", "-p", "StatusText", "--value").check().out
    journal = guest.run("journalctl", "-u", "shadowplane-agentd", "--no-pager", "-o", "cat").out
    assert "connected" in agent and "BPF on" in agent, f"{agent}\n--- the agent's journal\n{journal[-4000:]}"


def test_the_service_address_is_held_by_the_primary(walked: Walk, guest: Guest) -> None:
    services = json.loads(guest.run("shadowctl", "services", "--json").check().out)
    (hello,) = [s for s in services if s["name"] == "hello"]
    host = guest.run("hostname").check().out.strip()
    assert hello["owner"] == host, hello
    addrs = guest.run("ip", "-j", "addr", "show", "dev", "sp-trial").check().out
    held = [a["local"] for link in json.loads(addrs) for a in link["addr_info"]]
    assert "192.0.2.100" in held, held


def test_journald_carries_the_structured_fields(walked: Walk, guest: Guest) -> None:
    out = guest.run("journalctl", "-u", "shadowplane-agentd", "-o", "json", "--no-pager").check().out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ours = [r for r in records if r.get("SHADOWPLANE_COMPONENT") == "agentd"]
    assert ours, "no journal record with SHADOWPLANE_COMPONENT=agentd"
    assert all("CODE_FILE" in r and "LOGGER" in r and "PRIORITY" in r for r in ours)
    ctl = guest.run("journalctl", "SHADOWPLANE_COMPONENT=controller", "-o", "json", "--no-pager").check().out
    assert any(
        json.loads(line).get("SYSLOG_IDENTIFIER") == "shadowplane-controller" for line in ctl.splitlines()
    )


def test_the_agent_runs_with_exactly_its_four_capabilities(walked: Walk, guest: Guest) -> None:
    pid = guest.run("systemctl", "show", "shadowplane-agentd", "-p", "MainPID", "--value").check().out.strip()
    status = guest.read_file(f"/proc/{pid}/status")
    caps = {
        k: int(v, 16)
        for k, v in (line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    }
    # CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_PERFMON 38, CAP_BPF 39
    want = (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39)
    assert caps["CapBnd"] == want, hex(caps["CapBnd"])
    assert caps["CapEff"] & ~want == 0, hex(caps["CapEff"])
