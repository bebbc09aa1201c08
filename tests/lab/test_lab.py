"""The lab: its plan and configs (pure), the outage arithmetic (pure), and a real lab in network namespaces
(root): up, status, web servers, agents, faults, the split-brain checker, down, and down after a crash."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from agentd.cgroupfs import CgroupLayout
from agentd.config import load_agent_config
from controller.config import FailoverConfig, HealthCheckConfig, load_controller_config
from lab import configs, topology
from lab.poller import (
    Outage,
    Poller,
    Record,
    outage_between,
    outages,
    read_records,
    responder_changes,
)
from lab.procs import child_env, python_module, spawn
from lab.runner import STATE_FILE, Lab, LabError
from lab.spec import CGROUP_ROOT, PREFIX, Spec, SpecError, Timings, plan, shipped_timings
from lab.vipcheck import VipChecker
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from tests.support import ROOT, need_root, remove_leftover_lab, wait_until

# ---- pure: plan, configs, outages ----


def test_plan_default_topology() -> None:
    p = plan(Spec())
    assert [(h.name, h.role, h.namespace, h.ipv4, h.ipv6, h.bridge_port) for h in p.hosts] == [
        ("ctl", "controller", "splab-ctl", "10.77.0.2", "fd77::2", "ctl-port"),
        ("client", "client", "splab-client", "10.77.0.3", "fd77::3", "client-port"),
        ("p1", "primary", "splab-p1", "10.77.0.11", "fd77::11", "p1-port"),
        ("s1", "shadow", "splab-s1", "10.77.0.21", "fd77::21", "s1-port"),
        ("s2", "shadow", "splab-s2", "10.77.0.22", "fd77::22", "s2-port"),
    ]
    [web] = p.services
    assert (web.name, web.vip, web.primary, web.shadows) == ("web", "10.77.0.101/24", "p1", ("s1", "s2"))
    assert p.host("controller") is p.host("ctl")
    assert p.controller_address == "10.77.0.2:7400"


def test_plan_several_primaries_dns_ipv6() -> None:
    p = plan(Spec(primaries=3, shadows=1, dns=True, ipv6_vips=True))
    assert [s.name for s in p.services] == ["web1", "web2", "web3"]
    assert [s.vip for s in p.services] == ["fd77::101/64", "fd77::102/64", "fd77::103/64"]
    assert p.host("dns").ipv4 == "10.77.0.53"
    assert [w.name for w, role in p.workloads("s1")] == ["web1", "web2", "web3"]
    with pytest.raises(SpecError):
        plan(Spec(primaries=0))


def test_configs_load_with_the_daemons_own_loaders(tmp_path: Path) -> None:
    p = plan(Spec(primaries=2, shadows=2, dns=True))
    ctl = tmp_path / "controller.toml"
    ctl.write_text(configs.controller_toml(p, tmp_path, tsig_secret="c2VjcmV0"))
    cfg = load_controller_config(ctl)
    assert cfg.listen == "10.77.0.2:7400"
    assert cfg.store.path == tmp_path / "controller.db"
    # mutual TLS unless the spec says plaintext, with the files `issue_certificates` makes
    assert not cfg.tls.plaintext
    assert (cfg.tls.ca, cfg.tls.cert) == (tmp_path / "tls/ca.pem", tmp_path / "tls/controller-controller.pem")
    t = Timings()
    assert (cfg.failover.lease_seconds, cfg.failover.renew_interval_seconds) == (t.lease_seconds, 0.05)
    assert [(h.name, h.address) for h in cfg.host] == [
        ("p1", "10.77.0.11"),
        ("p2", "10.77.0.12"),
        ("s1", "10.77.0.21"),
        ("s2", "10.77.0.22"),
    ]
    web2 = cfg.service[1]
    assert (web2.name, web2.primary, web2.shadows, web2.vip) == ("web2", "p2", ["s1", "s2"], "10.77.0.102/24")
    assert (web2.failback, web2.failback_hold_seconds, web2.flap_window_seconds) == ("auto", 5.0, 0.0)
    assert (web2.health.kind, web2.health.port, web2.health.fall) == ("http", 8080, t.health_fall)
    assert web2.dns is not None and web2.dns.server == "10.77.0.53:53"
    agent = tmp_path / "agentd.toml"
    agent.write_text(configs.agent_toml(p, "s1", tmp_path))
    a = load_agent_config(agent)
    assert (a.controller, a.host, a.peer_listen) == ("10.77.0.2:7400", "s1", "10.77.0.21:7401")
    assert a.hooks_dir == tmp_path / "hooks" / "s1"
    assert a.capture.bpf is False
    assert (a.tls.cert, a.tls.key) == (tmp_path / "tls/agent-s1.pem", tmp_path / "tls/agent-s1.key")
    plain = plan(Spec(plaintext=True))
    agent.write_text(configs.agent_toml(plain, "s1", tmp_path))
    ctl.write_text(configs.controller_toml(plain, tmp_path))
    assert load_agent_config(agent).tls.plaintext and load_controller_config(ctl).tls.plaintext
    assert [(w.name, w.cgroup, w.role, w.interface) for w in a.workload] == [
        ("web1", "/splab/s1/web1", "shadow", "eth0"),
        ("web2", "/splab/s1/web2", "shadow", "eth0"),
    ]


def test_keepalived_config_priorities() -> None:
    p = plan(Spec())
    assert "priority 150" in configs.keepalived_conf(p, "p1", 1.0)
    s2 = configs.keepalived_conf(p, "s2", 0.1)
    assert "priority 90" in s2 and "advert_int 0.1" in s2 and "10.77.0.101/24 dev eth0" in s2
    assert "vrrp_version 3" in s2


def test_every_ip_command_names_a_lab_namespace() -> None:
    # the veth's far end is created straight in the host's namespace: nothing ever exists in the root one
    cmds = topology.switch_commands(plan(Spec(primaries=2)))
    veths = [c for c in cmds if "type veth" in c]
    assert len(veths) == 6 and all(f"netns {PREFIX}" in c for c in veths)


def test_failover_outage_bound_follows_the_slower_of_detection_and_fencing() -> None:
    # the lab's defaults: fencing a cut-off owner (its lease 0.25 s, then its address's kernel lifetime of
    # 1 s and the kernel's once-a-second check) outlasts detection (3 x 0.2 s checks + 0.2 s + tick)
    # (+ the scheduling margin, 0.1 s)
    fencing_bound = 0.01 + (0.25 + 2.0 + 0.001 + 0.005) + 0.05 + 0.01 + 0.1
    assert Timings().max_failover_outage_seconds() == pytest.approx(fencing_bound)
    slow_checks = Timings(health_interval_seconds=1.0, health_fall=3)  # detection: 3 + 0.2 + 0.02 s
    assert slow_checks.max_failover_outage_seconds() == pytest.approx(0.01 + 3.225 + 0.05 + 0.01 + 0.1)
    slow_client = Timings().max_failover_outage_seconds(client_poll_interval=0.1)
    assert slow_client == pytest.approx(fencing_bound + 2 * 0.09), "one poll interval on each side"


def test_shipped_timings_are_the_config_defaults() -> None:
    # the outage benchmark's "shipped defaults" row is what a fleet gets from the config dataclasses
    t = shipped_timings()
    fo, hc = FailoverConfig(), HealthCheckConfig()
    assert (t.lease_seconds, t.renew_interval_seconds, t.heartbeat_timeout_seconds) == (
        fo.lease_seconds,
        fo.renew_interval_seconds,
        fo.heartbeat_timeout_seconds,
    )
    assert (t.health_interval_seconds, t.health_timeout_seconds, t.health_fall, t.health_rise) == (
        hc.interval_seconds,
        hc.timeout_seconds,
        hc.fall,
        hc.rise,
    )
    assert t.failback_hold_seconds == Timings().failback_hold_seconds, "the lab's pacing is kept"
    assert plan(Spec(timings=t)).spec.validate() is None


def rec(t: float, ok: bool, who: str = "") -> Record:
    return Record(sent=t, ok=ok, responder=who if ok else "", error="" if ok else "timeout")


def test_outages_from_synthetic_records() -> None:
    records = [
        rec(0.00, True, "p1"),
        rec(0.01, True, "p1"),
        rec(0.03, False),  # sent out of order on purpose: outages go by send time
        rec(0.02, False),
        rec(0.04, False),
        rec(0.05, True, "s1"),
        rec(0.06, True, "s1"),
        rec(0.07, False),
        rec(0.08, True, "s1"),
        rec(0.09, False),
    ]
    got = outages(records)
    assert got[0] == Outage(0.01, 0.05, 3, "p1", "s1")
    assert got[0].duration == pytest.approx(0.04)
    assert got[1] == Outage(0.06, 0.08, 1, "s1", "s1")
    assert got[2] == Outage(0.08, None, 1, "s1", "") and got[2].duration is None
    assert outages([rec(0.0, False), rec(0.01, True, "p1")]) == [Outage(None, 0.01, 1, "", "p1")]
    assert outages([rec(0.0, True, "p1"), rec(0.01, True, "p1")]) == []
    total, n = outage_between(records, 0.0, 0.075)
    assert n == 2 and total == pytest.approx(0.06)
    assert outage_between(records, 0.08, 1.0) == (None, 1)
    assert responder_changes(records) == [(0.0, "p1"), (0.05, "s1")]


# ---- the lab's command, and its processes finding it (no root) ----


def test_python_m_lab_from_the_checkout_lists_its_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "lab", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m lab")
    listed = re.findall(r"^    (\S+)\s", out.stdout, re.M)
    assert {"up", "down", "status", "scenario", "demo", "chaos"} <= set(listed), out.stdout
    chaos = subprocess.run(
        [sys.executable, "-m", "lab", "chaos", "--list"], capture_output=True, text=True, cwd=ROOT
    )
    assert chaos.returncode == 0, chaos.stderr
    assert "cpu-saturation" in chaos.stdout and "rogue-agent-cert" in chaos.stdout
    step = subprocess.run(
        [sys.executable, "-m", "lab", "scenario", "step-load", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert step.returncode == 0 and "--baseline" in step.stdout, step.stderr


def test_processes_the_lab_starts_import_it_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The venv has no lab (it is not installed): outside the checkout, only the PYTHONPATH that lab.procs
    # gives its children finds it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    argv = [sys.executable, "-m", "lab.httpd", "--help"]
    bare = subprocess.run(argv, capture_output=True, text=True)
    assert bare.returncode != 0 and "No module named 'lab'" in bare.stderr, bare.stderr
    got = subprocess.run(argv, capture_output=True, text=True, env=child_env())
    assert got.returncode == 0 and "--port" in got.stdout, got.stderr
    log = tmp_path / "poller.log"
    assert spawn(python_module("lab.poller", "--help"), log).wait(30) == 0, log.read_text()


# ---- a real lab ----


def lab_processes(workdir: Path) -> list[psutil.Process]:
    """Running (not zombie) processes whose command line names the lab's work directory."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(workdir) in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


def assert_nothing_left(workdir: Path, pids: list[int]) -> None:
    assert topology.list_namespaces() == []
    assert [d for d in CgroupLayout.detect().dirs(CGROUP_ROOT) if d.exists()] == []
    assert lab_processes(workdir) == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not STATE_FILE.exists()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need_root()
    remove_leftover_lab()
    with Lab.up(Spec()) as the_lab:
        yield the_lab


@pytest.mark.root
@pytest.mark.lab
def test_status_lists_every_host(lab: Lab) -> None:
    st = lab.status()
    assert st["controller"] == "10.77.0.2:7400"
    hosts = {h["name"]: h for h in st["hosts"]}
    assert set(hosts) == {"ctl", "client", "p1", "s1", "s2"}
    assert hosts["p1"]["namespace"] == "splab-p1" and hosts["p1"]["role"] == "primary"
    assert hosts["s2"]["addresses"] == ["10.77.0.22/24", "fd77::22/64"]
    assert hosts["s1"]["bridge_port"] == "s1-port" and hosts["s1"]["role"] == "shadow"
    assert set(hosts["ctl"]["processes"]) == {"controller"}
    for name in ("p1", "s1", "s2"):
        assert set(hosts[name]["processes"]) == {"agent", "httpd"}
    assert all(h["alive"] for h in st["hosts"])
    [web] = st["services"]
    assert (web["name"], web["vip"], web["primary"], web["shadows"]) == (
        "web",
        "10.77.0.101/24",
        "p1",
        ["s1", "s2"],
    )
    assert web["owner"] == (web["owners"][0] if len(web["owners"]) == 1 else None)
    # the CLI prints the same thing as JSON
    out = subprocess.run(
        [sys.executable, "-m", "lab", "status", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert '"bridge_port": "p1-port"' in out.stdout


@pytest.mark.root
@pytest.mark.lab
def test_processes_live_in_their_namespace_and_cgroup(lab: Lab) -> None:
    for host in ("p1", "s1", "s2"):
        ns_inode = os.stat(f"/run/netns/splab-{host}").st_ino
        for kind in ("agent", "httpd"):
            pid = lab._proc(f"{kind}-{host}").pid
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode, f"{kind}-{host}"
        httpd = lab._proc(f"httpd-{host}").pid
        assert f"/splab/{host}/web" in Path(f"/proc/{httpd}/cgroup").read_text()


@pytest.mark.root
@pytest.mark.lab
def test_web_servers_answer_their_names_from_the_client(lab: Lab) -> None:
    for host in ("p1", "s1", "s2"):
        h = lab.host(host)
        assert lab.http_get("client", h.ipv4) == (200, f"{host}\n")
        assert lab.http_get("client", h.ipv6) == (200, f"{host}\n")


@pytest.mark.root
@pytest.mark.lab
def test_agents_connect_to_the_controller(lab: Lab) -> None:
    rows = lab.wait_agents_connected(10)
    assert {r["host"]: (r["connected"], r["health"]) for r in rows} == {
        h: (True, "healthy") for h in ("p1", "s1", "s2")
    }


@pytest.mark.root
@pytest.mark.lab
def test_the_lab_runs_mutual_tls(lab: Lab) -> None:
    # the lab's operator certificate works; no certificate, or an agent's, gets nothing from the Fleet API
    assert lab.fleet().ListServices(fpb.ListServicesRequest(), timeout=5).services
    fwd = topology.Forwarder(lab.host("ctl").namespace, (lab.host("ctl").ipv4, 7400))
    try:
        opts = [("grpc.enable_http_proxy", 0), ("grpc.ssl_target_name_override", "shadowplane-controller")]
        tls = lab.operator_tls()
        assert tls.ca is not None
        agent = configs.credentials(lab.workdir, "agent", "s1")
        attempts = {
            "plaintext": grpc.insecure_channel(fwd.address, options=opts[:1]),
            "no client certificate": grpc.secure_channel(
                fwd.address, grpc.ssl_channel_credentials(tls.ca.read_bytes()), options=opts
            ),
            "an agent certificate": grpc.secure_channel(
                fwd.address,
                grpc.ssl_channel_credentials(
                    tls.ca.read_bytes(), agent.key.read_bytes(), agent.cert.read_bytes()
                ),
                options=opts,
            ),
        }
        for what, ch in attempts.items():
            with ch, pytest.raises(grpc.RpcError) as e:
                fgrpc.FleetStub(ch).Failover(fpb.FailoverRequest(service="web", to="s1"), timeout=3)
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED), what
    finally:
        fwd.close()


@pytest.mark.root
@pytest.mark.lab
def test_delay_line_holds_the_hosts_packets(lab: Lab) -> None:
    # the stand-in for netem's delay (this kernel has none): every packet p1 sends waits 100 ms, and arrives
    p1 = lab.host("p1").ipv4
    lab.add_delay("p1", 0.1)
    try:
        t0 = time.monotonic()
        assert lab.http_get("client", p1) == (200, "p1\n")
        slow = time.monotonic() - t0
    finally:
        lab.clear_impairments("p1")
    assert slow >= 0.2, "an HTTP GET takes two of p1's packets (SYN-ACK, answer): at least 200 ms"
    assert "packets delayed" in lab.logs("delayline-p1") and not lab.alive("delayline-p1")
    assert lab.http_get("client", p1) == (200, "p1\n")


@pytest.mark.root
@pytest.mark.lab
def test_pollers_in_process_and_in_the_client_namespace(lab: Lab, tmp_path: Path) -> None:
    url = f"http://{lab.host('s2').ipv4}:8080/"
    assert lab.poller().target.host == "10.77.0.101"  # the VIP's poller; this test polls s2 itself
    poller = Poller(url, netns=lab.host("client").namespace).start()
    time.sleep(0.3)
    records = poller.stop()
    assert len(records) >= 20 and all(r.ok and r.responder == "s2" for r in records)
    out = tmp_path / "records.jsonl"
    proc = lab.popen_in(
        "client", [sys.executable, "-m", "lab.poller", "--url", url, "--out", str(out)], cwd=ROOT
    )
    wait_until(lambda: out.exists() and len(read_records(out)) >= 20, 10, "poller records")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    got = read_records(out)
    assert all(r.ok and r.responder == "s2" for r in got) and outages(got) == []


@pytest.mark.root
@pytest.mark.lab
def test_cut_link_and_partition(lab: Lab) -> None:
    s2 = lab.host("s2").ipv4
    lab.cut_link("s2")
    try:
        assert not topology.port_open("splab-client", s2, 8080, timeout=0.3)
    finally:
        lab.restore_link("s2")
    wait_until(lambda: topology.port_open("splab-client", s2, 8080), 5, "s2 back after its link is restored")
    lab.partition("client", "s2")
    try:
        assert not topology.port_open("splab-client", s2, 8080, timeout=0.3)
        assert topology.port_open("splab-client", lab.host("s1").ipv4, 8080)
    finally:
        lab.heal("client", "s2")
    assert topology.port_open("splab-client", s2, 8080)


@pytest.mark.root
@pytest.mark.lab
def test_vipcheck_sees_a_duplicated_address_and_nothing_else(lab: Lab) -> None:
    test_ip = "10.77.0.250"
    checker = VipChecker(
        {h.name: h.namespace for h in lab.plan.hosts}, [test_ip, lab.service().vip_ip]
    ).start()
    try:
        topology.ip_in("splab-s1", "addr", "add", f"{test_ip}/24", "dev", "eth0")
        time.sleep(0.1)
        assert checker.snapshot().split_brains == []
        topology.ip_in("splab-s2", "addr", "add", f"{test_ip}/24", "dev", "eth0")
        time.sleep(0.1)
        topology.ip_in("splab-s2", "addr", "del", f"{test_ip}/24", "dev", "eth0")
        t_removed = time.monotonic()
        time.sleep(0.1)
    finally:
        topology.ip_in("splab-s1", "addr", "del", f"{test_ip}/24", "dev", "eth0", check=False)
        topology.ip_in("splab-s2", "addr", "del", f"{test_ip}/24", "dev", "eth0", check=False)
        report = checker.stop()
    split = report.split_brains
    assert split, "two hosts held 10.77.0.250 for 100 ms and the checker saw no split brain"
    assert {s.vip for s in split} == {test_ip} and all(s.holders == ("s1", "s2") for s in split)
    assert all(s.t <= t_removed for s in split)
    assert 5 <= len(split) <= 15  # ~100 ms at one sample per 10 ms
    assert report.samples >= 25 and report.max_gap < 0.1 and report.errors == []


@pytest.mark.root
@pytest.mark.lab
def test_a_second_lab_is_refused(lab: Lab) -> None:
    with pytest.raises(LabError, match="lab down"):
        Lab.up(Spec())


@pytest.mark.root
@pytest.mark.lab
def test_down_removes_everything(lab: Lab) -> None:
    pids = [r.pid for r in lab.state.processes]
    removed = lab.down()
    assert "namespace splab-sw" in removed and f"cgroup {CGROUP_ROOT}" in removed
    assert_nothing_left(lab.workdir, pids)
    assert not lab.workdir.exists()
    assert lab.down() == []  # idempotent


@pytest.mark.root
@pytest.mark.lab
def test_down_after_a_crash_without_state_file() -> None:
    need_root()
    remove_leftover_lab()
    crashed = Lab.up(Spec(shadows=1), wait=False)
    try:
        pids = [r.pid for r in crashed.state.processes]
        # the controller and an agent died, the rest are orphans; the state file is gone
        os.kill(crashed._proc("controller").pid, signal.SIGKILL)
        os.kill(crashed._proc("agent-p1").pid, signal.SIGKILL)
        STATE_FILE.unlink()
        out = subprocess.run([sys.executable, "-m", "lab", "down"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "removed namespace splab-p1" in out.stdout and f"removed cgroup {CGROUP_ROOT}" in out.stdout
        assert_nothing_left(crashed.workdir, pids)
        assert not crashed.workdir.exists()
    finally:
        crashed.down()
