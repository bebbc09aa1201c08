from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentd.config import AgentConfig, load_agent_config
from controller.config import ControllerConfig, load_controller_config
from shadowplane.config import ConfigError, reference

GOOD = """
controller = "10.0.0.1:7400"
host = "web-1"
interval_seconds = 5
[tls]
plaintext = true
[capture]
syscall_latency_sample_every = 4
[[workload]]
name = "web"
cgroup = "/shadowplane.slice/web"
role = "primary"
service = "web"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agentd.toml"
    p.write_text(text)
    return p


def test_good_config_loads_with_types(tmp_path: Path) -> None:
    cfg = load_agent_config(write(tmp_path, GOOD))
    assert cfg.interval_seconds == 5.0 and isinstance(cfg.interval_seconds, float)
    assert cfg.capture.syscall_latency_sample_every == 4
    assert cfg.capture.bpf is True  # default kept
    assert cfg.workload[0].role == "primary"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (GOOD.replace('role = "primary"', 'role = "primay"'), "workload[0].role", "must be one of 'primary'"),
        (
            GOOD.replace("interval_seconds = 5", 'interval_seconds = "5s"'),
            "interval_seconds",
            "must be a number",
        ),
        (
            GOOD.replace("interval_seconds = 5", "interval_secs = 5"),
            "interval_secs",
            "did you mean 'interval_seconds'",
        ),
        (GOOD.replace('controller = "10.0.0.1:7400"', 'controller = "10.0.0.1"'), "controller", "HOST:PORT"),
        (
            GOOD.replace('cgroup = "/shadowplane.slice/web"', 'cgroup = "web"'),
            "workload[0].cgroup",
            "absolute",
        ),
        (GOOD.replace('service = "web"\n', ""), "workload[0].service", "is required"),
        # a workload is a cgroup path or a systemd unit: exactly one, and the error says which to set
        (
            GOOD.replace(
                'cgroup = "/shadowplane.slice/web"', 'cgroup = "/shadowplane.slice/web"\nunit = "web.service"'
            ),
            "workload[0].unit",
            "set exactly one of `unit`",
        ),
        (
            GOOD.replace('cgroup = "/shadowplane.slice/web"\n', ""),
            "workload[0].unit",
            'e.g. unit = "nginx.service"',
        ),
        (
            GOOD.replace('cgroup = "/shadowplane.slice/web"', 'unit = "nginx"'),
            "workload[0].unit",
            "must name a systemd service, slice or scope",
        ),
        (
            GOOD.replace('cgroup = "/shadowplane.slice/web"', 'unit = "ng inx.service"'),
            "workload[0].unit",
            "not a valid systemd unit name",
        ),
        (
            GOOD.replace("syscall_latency_sample_every = 4", "syscall_latency_sample_every = 0"),
            "capture.syscall_latency_sample_every",
            "between 1 and 1024",
        ),
        (
            GOOD.replace(
                "syscall_latency_sample_every = 4",
                "syscall_latency_sample_every = 4\nsyscall_latency_window_seconds = 20",
            ),
            "capture.syscall_latency_window_seconds",
            "longer than syscall_latency_period_seconds (10); make it at most the period",
        ),
        (GOOD + GOOD[GOOD.index("[[workload]]") :], "workload", "used twice"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_agent_config(write(tmp_path, text))
    assert e.value.field == field
    assert words in str(e.value)
    assert str(tmp_path / "agentd.toml") in str(e.value)


def test_a_workload_named_by_its_unit_loads(tmp_path: Path) -> None:
    cfg = load_agent_config(
        write(tmp_path, GOOD.replace('cgroup = "/shadowplane.slice/web"', 'unit = "web.slice"'))
    )
    assert (cfg.workload[0].unit, cfg.workload[0].cgroup) == ("web.slice", "")


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(write(tmp_path, "host = \n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_agent_config(tmp_path / "nope.toml")


def test_controller_config_checks_store_and_hosts(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[store]\nretention_hours = -1\n")
    with pytest.raises(ConfigError) as e:
        load_controller_config(p)
    assert e.value.field == "store.retention_hours"
    p.write_text('[tls]\nplaintext = true\n[[host]]\nname = "a"\n[[host]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="listed twice"):
        load_controller_config(p)


def test_tls_is_required_unless_plaintext_is_explicit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_agent_config(write(tmp_path, GOOD.replace("[tls]\nplaintext = true\n", "")))
    assert e.value.field == "tls.ca" and "shadowctl certs init" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_agent_config(write(tmp_path, GOOD.replace("plaintext = true", 'ca = "/x/ca.pem"')))
    assert e.value.field == "tls.cert"


def test_reference_lists_every_key_with_default() -> None:
    rows = {k: d for k, d, _ in reference(AgentConfig)}
    assert rows["interval_seconds"] == "10.0"
    assert rows["capture.syscall_latency_sample_every"] == "8"
    assert rows["cgroup_root"] == '"/sys/fs/cgroup"' and rows["capture.bpf"] == "true"
    assert rows["host"] == "the system host name"
    assert rows["workload.role"] == "(required)"


TRIAL = """
[tls]
plaintext = true
[[host]]
name = "box"
address = "127.0.0.1"
[[service]]
name = "web"
primary = "box"
"""


def test_a_service_without_shadows_is_a_trial_and_check_config_says_failover_is_off(tmp_path: Path) -> None:
    """One host, a primary and nothing else: watched, captured, forecast; no vip, no DNS, no fake shadow."""
    p = tmp_path / "c.toml"
    p.write_text(TRIAL)
    cfg = load_controller_config(p)
    assert cfg.service[0].shadows == [] and cfg.service[0].vip == "" and cfg.service[0].dns is None
    assert cfg.service[0].observer_names() == ["controller"]
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "service web: no shadow: failover disabled (service.shadows is empty)" in out.stdout, out.stdout


def test_a_service_with_shadows_needs_something_to_move(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        TRIAL.replace('address = "127.0.0.1"', 'address = "127.0.0.1"\n[[host]]\nname = "s1"')
        + 'shadows = ["s1"]\n'
    )
    with pytest.raises(ConfigError) as e:
        load_controller_config(p)
    assert e.value.field == "service[0].vip"
    assert "needs a vip, a [service.dns] section, or both" in str(e.value) and "shadows empty" in str(e.value)
    p.write_text(p.read_text() + 'vip = "10.0.0.100/24"\n')
    assert load_controller_config(p).service[0].shadows == ["s1"]


def test_the_reference_says_what_an_empty_shadows_and_vip_mean() -> None:
    rows = {k: m for k, _, m in reference(ControllerConfig)}
    assert "empty: no failover" in rows["service.shadows"]
    assert "a service with shadows needs a vip" in rows["service.vip"]


def _with_shadows(tmp_path: Path, shadows: list[str], observers: str = "") -> Path:
    hosts = "".join(f'[[host]]\nname = "{s}"\n' for s in shadows)
    p = tmp_path / "c.toml"
    p.write_text(
        TRIAL.replace('address = "127.0.0.1"\n', f'address = "127.0.0.1"\n{hosts}', 1)
        + f"shadows = {shadows!r}\n".replace("'", '"')
        + 'vip = "10.0.0.100/24"\n'
        + observers
    )
    return p


def test_the_default_quorum_survives_losing_the_controller(tmp_path: Path) -> None:
    """With one shadow, [controller, shadow] would need both for a majority: a controller restart (every
    package upgrade) would cost the owner its lease. The default lease quorum adds the primary; with two
    shadows the controller and the shadows are already three."""
    one = load_controller_config(_with_shadows(tmp_path, ["s1"])).service[0]
    assert one.lease_quorum() == ["controller", "box", "s1"]
    # the primary is a witness: it judges nobody's health (a failed primary cannot vouch for its shadow)
    assert one.observer_names() == ["controller", "s1"]
    assert one.quorum_problem() is None
    two = load_controller_config(_with_shadows(tmp_path, ["s1", "s2"])).service[0]
    assert two.lease_quorum() == two.observer_names() == ["controller", "s1", "s2"]
    assert two.quorum_problem() is None


@pytest.mark.parametrize("observers", ['["controller"]', '["controller", "s1"]'])
def test_an_explicit_quorum_that_needs_the_controller_is_warned_about(tmp_path: Path, observers: str) -> None:
    p = _with_shadows(tmp_path, ["s1"], f"observers = {observers}\n")
    problem = load_controller_config(p).service[0].quorum_problem()
    assert problem is not None and "every controller restart" in problem
    assert "observers = ['controller', 'box', 's1']" in problem, "the fix is named"
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr  # a warning: the config still runs
    assert "service web: warning: observers:" in out.stdout and "drops the VIP" in out.stdout, out.stdout


CLUSTER = '[cluster]\nname = "ctl1"\netcd = ["http://10.0.0.11:2379", "http://10.0.0.12:2379"]\n'


def test_replicas_hold_no_lease_seat_and_the_quorum_keeps_three_hosts(tmp_path: Path) -> None:
    """With [cluster] a lease's voters are hosts only (an observer's promise is one memory, and replicas
    are several): the primary as a witness and the shadows. "controller" still judges health: the leading
    replica's own checks."""
    p = _with_shadows(tmp_path, ["s1", "s2"])
    p.write_text(CLUSTER + p.read_text())
    cfg = load_controller_config(p)
    svc = cfg.service[0]
    assert cfg.cluster is not None and cfg.cluster.name == "ctl1" and cfg.cluster.ttl_seconds == 3
    assert svc.lease_quorum(replicas=True) == ["box", "s1", "s2"]
    assert svc.observer_names() == ["controller", "s1", "s2"]
    assert svc.lease_quorum() == ["controller", "s1", "s2"], "without [cluster]: unchanged"


def test_replicas_refuse_a_quorum_of_two_hosts_and_name_the_fix(tmp_path: Path) -> None:
    p = _with_shadows(tmp_path, ["s1"])
    p.write_text(CLUSTER + p.read_text())
    with pytest.raises(ConfigError) as e:
        load_controller_config(p)
    assert "service[0].observers" in str(e.value) and "['box', 's1']" in str(e.value)
    assert "observers = ['controller', 's1', 'WITNESS']" in str(e.value), "the fix is named"
    # a witness host makes three
    p = _with_shadows(tmp_path, ["s1", "w1"], 'observers = ["controller", "s1", "w1"]\n')
    p.write_text(CLUSTER + p.read_text().replace('shadows = ["s1", "w1"]', 'shadows = ["s1"]'))
    assert load_controller_config(p).service[0].lease_quorum(replicas=True) == ["box", "s1", "w1"]


@pytest.mark.parametrize(
    ("cluster", "field", "fix"),
    [
        ('name = "a"\netcd = ["10.0.0.11:2379"]\n', "cluster.etcd", "https://HOST:PORT"),
        ('name = "a"\netcd = []\n', "cluster.etcd", "must name the etcd members"),
        ('name = "a"\netcd = ["https://10.0.0.11:2379"]\n', "cluster.ca", "CA"),
        (
            'name = "a"\netcd = ["http://e:2379"]\nrequest_timeout_seconds = 2.0\n',
            "request_timeout",
            "lower it",
        ),
        ('name = "a"\netcd = ["http://e:2379"]\nprefix = "sp/"\n', "prefix", "start with /"),
    ],
)
def test_a_bad_cluster_table_names_the_field_and_the_fix(
    tmp_path: Path, cluster: str, field: str, fix: str
) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[cluster]\n" + cluster + TRIAL)
    with pytest.raises(ConfigError) as e:
        load_controller_config(p)
    assert field in str(e.value) and fix in str(e.value), str(e.value)
