"""Upgrade and purge on the stock Debian 12 host the walkthrough set up (this module runs last: its name
sorts after the others'). An upgrade keeps the edited configurations, the certificates and the controller's
data, and leaves both daemons running the new version; purge removes everything the package made."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.vm.conftest import VERSION
from tests.vm.guest import ROOT, Guest
from tests.vm.walkthrough import Walk

KEEP_CONFFILES = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"


def release_2() -> Path:
    """The same code as release 2, in a directory the guest sees (build.sh reuses the staged venv)."""
    out = ROOT / "build/vm-upgrade"
    p = subprocess.run(
        ["bash", str(ROOT / "packaging/build.sh"), "--release", "2", "--format", "deb", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out / f"shadowplane_{VERSION}-2_amd64.deb"


def test_upgrade_keeps_configs_certificates_and_data(walked: Walk, guest: Guest) -> None:
    events_before = json.loads(guest.run("shadowctl", "services", "--json").check().out)
    agentd = guest.read_file("/etc/shadowplane/agentd.toml")
    controller = guest.read_file("/etc/shadowplane/controller.toml")
    assert "[[workload]]" in agentd and "[[service]]" in controller
    deb2 = release_2()
    guest.sh(
        f"DEBIAN_FRONTEND=noninteractive apt-get install -y {KEEP_CONFFILES} {guest.host_path(deb2)}",
        timeout=900,
    ).check()
    assert guest.run("dpkg-query", "-W", "-f=${Version}", "shadowplane").check().out == f"{VERSION}-2"
    assert guest.read_file("/etc/shadowplane/agentd.toml") == agentd, (
        "the upgrade changed the edited agentd.toml"
    )
    assert guest.read_file("/etc/shadowplane/controller.toml") == controller
    assert guest.run("test", "-s", "/etc/shadowplane/tls/agent.key").rc == 0, "the certificates are gone"
    assert guest.run("test", "-s", "/var/lib/shadowplane/controller.db").rc == 0, (
        "the controller's store is gone"
    )
    # postinst restarted the controller into the new version; the agent, whose restart the operator times,
    # runs on (its files were replaced under it)
    for unit in ("shadowplane-controller", "shadowplane-agentd"):
        assert guest.run("systemctl", "is-active", unit).out.strip() == "active", unit
    # the store kept what it knew: the service, its owner and its token history
    after = json.loads(guest.run("shadowctl", "services", "--json", timeout=120).check().out)
    assert [s["name"] for s in after] == [s["name"] for s in events_before]
    assert after[0]["token"] >= events_before[0]["token"] >= 1, (events_before, after)


def test_purge_removes_what_the_package_made(walked: Walk, guest: Guest) -> None:
    guest.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y shadowplane", timeout=900).check()
    assert guest.run("dpkg-query", "-W", "-f=${Status}", "shadowplane").out.strip() in (
        "",
        "unknown ok not-installed",
    )
    for path in ("/opt/shadowplane", "/var/lib/shadowplane", "/usr/bin/shadowctl", "/run/shadowplane-agentd"):
        assert guest.run("test", "-e", path).rc != 0, f"{path} survived the purge"
    # what is left in /etc/shadowplane is only what the operator put there: the first hour's certificates
    # (docs/operations.md, "Removal": they are not the package's to delete)
    left = set(guest.sh("cd /etc/shadowplane && find . -mindepth 1").check().out.split())
    certificates = {
        f"./tls/{role}.{ext}" for role in ("agent", "controller", "shadowctl") for ext in ("pem", "key")
    }
    assert "./tls/agent.key" in left and left <= {"./tls", "./tls/ca.pem", *certificates}, left
    units = guest.run("systemctl", "list-unit-files", "shadowplane*", "--no-legend").out
    assert units.strip() == "", units
    # (no procps in the image: the command lines in /proc; "[a]" keeps grep from matching itself)
    running = guest.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c 'shadowplane-[a-z]'")
    assert running.out.strip() == "0", "a daemon still runs"
    # no service address left behind by the stopped agent
    addrs = json.loads(guest.run("ip", "-j", "addr", "show", "dev", "sp-trial").check().out)
    held = [a["local"] for link in addrs for a in link["addr_info"]]
    assert "192.0.2.100" not in held, held
