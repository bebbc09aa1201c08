"""The agent under systemd on the stock Debian 12 host: the watchdog restarts a hung agent, and
`systemctl restart shadowplane-agentd` on the owner keeps the service address in place (no failover, no new
token) when the lease covers the restart (README, "Restarting the daemons").

Under software emulation an agent restart takes tens of seconds (Python starts ~10x slower than on the host),
so the service's lease is raised to 60 s here; on real hardware the restart takes 1-3 s and a 5 s lease
covers it. A hitless controller restart needs two observers besides the controller (the lab tests that:
tests/failover/test_lab_failover.py); this one-host trial has only the controller as observer.
"""

from __future__ import annotations

import json
import re
import time

from tests.vm.guest import Guest
from tests.vm.walkthrough import Walk

LEASE_S = 60
VIP = "192.0.2.100"


def prop(guest: Guest, unit: str, name: str) -> str:
    return guest.run("systemctl", "show", unit, "-p", name, "--value").check().out.strip()


def wait_for(what: str, check: object, timeout: float, every: float = 2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def hello(guest: Guest) -> dict[str, object]:
    r = guest.run("shadowctl", "services", "--json", timeout=120)
    if r.rc != 0:
        return {}
    found: list[dict[str, object]] = [s for s in json.loads(r.out) if s["name"] == "hello"]
    return found[0] if found else {}


def vip_held(guest: Guest) -> bool:
    return VIP in guest.run("ip", "-br", "addr", "show", "dev", "sp-trial").out


def test_the_watchdog_restarts_a_hung_agent(walked: Walk, guest: Guest) -> None:
    unit = "shadowplane-agentd"
    pid = prop(guest, unit, "MainPID")
    restarts = int(prop(guest, unit, "NRestarts"))
    guest.run("kill", "-STOP", pid).check()
    # WatchdogSec=30s as shipped, then RestartSec=2s and a start (slow under emulation)
    wait_for(
        "a new agent after the watchdog fired",
        lambda: (
            prop(guest, unit, "MainPID") not in (pid, "0") and prop(guest, unit, "ActiveState") == "active"
        ),
        timeout=600,
    )
    assert int(prop(guest, unit, "NRestarts")) == restarts + 1
    journal = guest.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").check().out
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal, journal[-2000:]


def test_restarting_the_owner_agent_keeps_the_address(walked: Walk, guest: Guest) -> None:
    conf = guest.read_file("/etc/shadowplane/controller.toml")
    conf, n = re.subn(r"(?m)^lease_seconds = .*$", f"lease_seconds = {LEASE_S}.0", conf)
    assert n == 1
    conf = re.sub(r"(?m)^renew_interval_seconds = .*$", "renew_interval_seconds = 1.0", conf)
    guest.write_file("/etc/shadowplane/controller.toml", conf, mode=0o640)
    guest.run("chgrp", "shadowplane", "/etc/shadowplane/controller.toml").check()
    guest.run("systemctl", "restart", "shadowplane-controller", timeout=900).check()
    # the first placement under the new lease waits out the old one's bound (lease + lifetime + 1 s)
    wait_for(
        "hello owned again", lambda: bool(hello(guest).get("owner")) and vip_held(guest), timeout=900, every=5
    )
    before = hello(guest)
    last_event = guest.run("shadowctl", "events", "--json", timeout=120).check().out.strip().splitlines()
    since_id = json.loads(last_event[-1])["id"] if last_event else 0

    # sample the address every 0.1 s in the guest while the agent restarts
    guest.run(
        "systemd-run", "--unit", "sp-vipwatch", "/bin/sh", "-c",
        f"while :; do ip -br addr show dev sp-trial | grep -c {VIP} >> /run/sp-vip-samples; sleep 0.1; done",
    ).check()  # fmt: skip
    try:
        guest.run("systemctl", "restart", "shadowplane-agentd", timeout=900).check()
        wait_for(
            "the restarted agent resuming its lease",
            lambda: "resumed lease" in guest.run("journalctl", "-u", "shadowplane-agentd", "-o", "cat").out,
            timeout=600,
        )
        time.sleep(5)
    finally:
        guest.run("systemctl", "stop", "sp-vipwatch")
    samples = guest.read_file("/run/sp-vip-samples").split()
    assert len(samples) > 50, samples
    assert set(samples) == {"1"}, f"{samples.count('0')} of {len(samples)} samples without {VIP}"
    after = hello(guest)
    assert after["owner"] == before["owner"] and after["token"] == before["token"], (before, after)
    events = [
        json.loads(line) for line in guest.run("shadowctl", "events", "-n", "500", "--json").out.splitlines()
    ]
    kinds = [e["kind"] for e in events if e["id"] > since_id and e["service"] == "hello"]
    assert "lease-resumed" in kinds, kinds
    assert not [
        k for k in kinds if k in ("failover", "reacquire", "place", "lease-lost", "lease-acquired")
    ], kinds
    journal = guest.run("journalctl", "-u", "shadowplane-agentd", "-o", "cat").out
    paused = re.findall(r"renewals paused (\d+) ms", journal)
    print(f"agent restart, emulated: renewals paused {paused[-1] if paused else '?'} ms (lease {LEASE_S} s)")
