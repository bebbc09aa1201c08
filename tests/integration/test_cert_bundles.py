"""The first run with `shadowctl certs`: a controller, an agent and an operator that use the packaged
configurations unchanged except for where /etc/shadowplane/tls/ is (each party's bundle directory here),
with the files `shadowctl certs issue` wrote, connect over mutual TLS without a file renamed. Real daemons,
real shadowctl, on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lab.procs import free_port, wait_for_port
from shadowctl.cli import main as shadowctl
from tests.support import Daemon, wait_until

ROOT = Path(__file__).resolve().parents[2]
TLS_DIR = "/etc/shadowplane/tls"


def packaged(name: str, bundle: Path, changes: dict[str, str]) -> str:
    """A packaged configuration with its TLS directory moved to `bundle` and top-level keys changed (the
    controller's address, ports, paths a test may write)."""
    text = (ROOT / "packaging/etc" / name).read_text().replace(TLS_DIR, str(bundle))
    for key, value in changes.items():
        text, n = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, f"{name} has no {key}"
    return text


def test_packaged_configs_use_the_issued_bundles_as_they_are(tmp_path: Path) -> None:
    ca = tmp_path / "fleet-ca"
    assert shadowctl(["certs", "init", "--dir", str(ca)]) == 0
    for args in (
        ["ctl-1", "--role", "controller", "--san", "127.0.0.1"],
        ["web-1"],
        ["alice", "--role", "operator"],
    ):
        assert shadowctl(["certs", "issue", *args, "--dir", str(ca)]) == 0
    port = free_port()
    # The metrics ports are off: other tests may hold them.
    (tmp_path / "controller.toml").write_text(
        packaged(
            "controller.toml", ca / "ctl-1", {"listen": f'"127.0.0.1:{port}"', "path": f'"{tmp_path}/c.db"'}
        ).replace('listen = "127.0.0.1:9465"', 'listen = ""')
    )
    (tmp_path / "agentd.toml").write_text(
        packaged(
            "agentd.toml",
            ca / "web-1",
            {"controller": f'"127.0.0.1:{port}"', "hooks_dir": f'"{tmp_path}/hooks"', "bpf": "false"},
        )
        .replace('listen = "127.0.0.1:9464"', 'listen = ""')
        .replace('# host = "web-1"', 'host = "web-1"')
    )
    controller = Daemon("controller.cli", tmp_path / "controller.toml", tmp_path / "controller.log").start()
    agent = Daemon("agentd.cli", tmp_path / "agentd.toml", tmp_path / "agentd.log")
    alice = ca / "alice"

    def hosts() -> list[dict[str, object]]:
        tls = {"SHADOWCTL_CA": "ca.pem", "SHADOWCTL_CERT": "shadowctl.pem", "SHADOWCTL_KEY": "shadowctl.key"}
        out = subprocess.run(
            [sys.executable, "-m", "shadowctl.cli", "--controller", f"127.0.0.1:{port}", "hosts", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=dict(os.environ, **{var: str(alice / name) for var, name in tls.items()}),
        )
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    try:
        wait_for_port("127.0.0.1", port, 30, controller.proc)
        agent.start()
        connected = wait_until(
            lambda: [h for h in hosts() if h["host"] == "web-1" and h["connected"]], 30, "web-1 to connect"
        )
        assert connected, agent.log_text()[-3000:]
        assert controller.alive(), controller.log_text()[-3000:]
    finally:
        agent.stop()
        controller.stop()
