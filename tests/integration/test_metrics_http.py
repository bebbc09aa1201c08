"""Both daemons' /metrics over real HTTP, from real processes, through `promtool check metrics`."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.procs import free_port, wait_for_port
from tests.support import PLAINTEXT, Daemon, Workload, need_root, wait_until
from tests.unit.test_metrics import promtool_check


def scrape(port: int) -> str:
    # no proxy: a CI host's http_proxy must not catch loopback scrapes
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def series(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in a scrape."""
    return {m[0]: float(m[1]) for m in re.findall(rf"^{name}(\{{.*?\}})? (\S+)$", text, re.M)}


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[Daemon, int, int]]:
    port, metrics_port = free_port(), free_port()
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'[store]\npath = "{tmp_path}/controller.db"\n'
        "[scaling]\ninterval_seconds = 1\nforecast_step_seconds = 1\n"
        '[[host]]\nname = "it-p1"\naddress = "127.0.0.1"\n'
        '[[host]]\nname = "it-s1"\naddress = "127.0.0.1"\n'
        '[[service]]\nname = "web"\nprimary = "it-p1"\nshadows = ["it-s1"]\nvip = "10.250.0.1/24"\n'
        "[service.health]\nport = 1\n" + PLAINTEXT
    )
    d = Daemon("controller.cli", cfg, tmp_path / "controller.log").start()
    try:
        wait_for_port("127.0.0.1", metrics_port, 20, d.proc)
        yield d, port, metrics_port
    finally:
        d.stop()


def test_controller_metrics_over_http_pass_promtool(controller: tuple[Daemon, int, int]) -> None:
    _, _, metrics_port = controller
    text = scrape(metrics_port)
    promtool_check(text)
    assert series(text, "shadowplane_controller_agents_connected") == {"": 0.0}
    assert series(text, "shadowplane_service_owner_info") == {'{owner="none",service="web"}': 1.0}
    assert series(text, "shadowplane_service_fencing_token") == {'{service="web"}': 0.0}
    assert series(text, "shadowplane_shadow_ready") == {'{host="it-s1",service="web"}': 0.0}
    assert len(series(text, "shadowplane_forecast_model_info")) == 1
    lag = series(text, "shadowplane_controller_loop_lag_seconds_bucket")
    assert (
        lag['{le="0.02"}']
        <= lag['{le="+Inf"}']
        == series(text, "shadowplane_controller_loop_lag_seconds_count")[""]
    )


def test_agent_metrics_over_http_pass_promtool(
    tmp_path: Path, controller: tuple[Daemon, int, int], workload_cgroup: Workload
) -> None:
    need_root()
    _, port, controller_metrics = controller
    metrics_port = free_port()
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(
        f'controller = "127.0.0.1:{port}"\nhost = "it-p1"\ninterval_seconds = 0.5\n'
        f'reconnect_max_seconds = 0.5\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        "[capture]\nsyscall_latency_window_seconds = 0.5\nsyscall_latency_period_seconds = 1.0\n"
        f'[[workload]]\nname = "web"\ncgroup = "{workload_cgroup.path}"\nrole = "primary"\nservice = "web"\n'
        + PLAINTEXT
    )
    agent = Daemon("agentd.cli", cfg, tmp_path / "agentd.log").start()
    load = workload_cgroup.popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=1000000000"])
    try:
        wait_for_port("127.0.0.1", metrics_port, 30, agent.proc)

        def connected_with_samples() -> str:
            text = scrape(metrics_port)
            ok = series(text, "shadowplane_agent_controller_connected") == {"": 1.0}
            timed = series(text, "shadowplane_agent_syscall_latency_timed_seconds_total")
            no_bpf = series(text, "shadowplane_agent_bpf_active") == {"": 0.0}
            bpf_timed = timed.get('{workload="web"}', 0) > 0 or no_bpf
            return text if ok and bpf_timed and 'cpu_seconds_total{workload="web"}' in text else ""

        text = str(wait_until(connected_with_samples, 30, "the agent's first batch and a connected stream"))
        promtool_check(text)
        assert series(text, "shadowplane_agent_cpu_seconds_total")['{workload="web"}'] > 0
        assert series(text, "shadowplane_agent_lease_held") == {'{service="web"}': 0.0}
        # the loop that runs the lease timers reports how late it runs, probing since the agent started
        assert series(text, "shadowplane_agent_loop_lag_seconds_count")[""] > 0
        assert '{le="+Inf"}' in series(text, "shadowplane_agent_loop_lag_seconds_bucket")
        if series(text, "shadowplane_agent_bpf_active") == {"": 1.0}:
            # dd's one-byte reads and writes: counted exactly, timed 1 in 8 inside the timing windows
            calls = series(text, "shadowplane_agent_syscalls_total")
            assert calls['{syscall="read",workload="web"}'] > 1000
            buckets = series(text, "shadowplane_agent_syscall_latency_seconds_bucket")
            assert len(buckets) == 32 and buckets['{le="+Inf",workload="web"}'] > 0

        # the controller now sees the agent, and the service's actual demand from its samples
        def controller_sees_demand() -> str:
            text = scrape(controller_metrics)
            return text if 'shadowplane_demand_cpu_cores{service="web"}' in text else ""

        text = str(wait_until(controller_sees_demand, 30, "the controller's demand series"))
        promtool_check(text)
        assert series(text, "shadowplane_controller_agents_connected") == {"": 1.0}
        assert series(text, "shadowplane_demand_cpu_cores")['{service="web"}'] > 0
    finally:
        load.kill()
        agent.stop()
