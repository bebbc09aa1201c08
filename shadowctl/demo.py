"""`shadowctl demo`: a controller and an agent on this host, a synthetic workload, live telemetry.

Everything it starts (processes, the workload cgroup, a scratch directory) is removed when it ends, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from agentd.cgroupfs import CgroupLayout
from shadowctl.fleet_cmds import _table, snapshot
from shadowctl.procs import free_port, python_module, spawn, stop, wait_for_port
from shadowplane.tls import TlsConfig, sync_channel
from shadowplane.v1.fleet_pb2_grpc import FleetStub

DEMO_CGROUP = "/shadowplane-demo/web"
LOOPBACK_TLS = "[tls]\nplaintext = true\n"  # everything stays on 127.0.0.1 and ends with the demo


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a controller + agent on this host and show live telemetry (root)")
    p.add_argument("--seconds", type=float, default=45.0, help="how long to show telemetry")
    p.add_argument("--interval", type=float, default=2.0, help="agent sampling interval")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    if os.geteuid() != 0:
        console.print("shadowctl demo needs root (cgroups and BPF); run it with sudo or as root")
        return 1
    work = Path(tempfile.mkdtemp(prefix="shadowplane-demo-"))
    layout = CgroupLayout.detect()
    port = free_port()
    procs = []
    try:
        (work / "controller.toml").write_text(
            f'listen = "127.0.0.1:{port}"\n[store]\npath = "{work}/controller.db"\n{LOOPBACK_TLS}'
        )
        (work / "agentd.toml").write_text(
            f'controller = "127.0.0.1:{port}"\nhost = "demo-host"\ninterval_seconds = {args.interval}\n'
            f'[[workload]]\nname = "web"\ncgroup = "{DEMO_CGROUP}"\nrole = "primary"\nservice = "web"\n'
            f"{LOOPBACK_TLS}"
        )
        console.print(f"[bold]starting controller[/] on 127.0.0.1:{port} (logs in {work})")
        ctl = spawn(
            python_module("controller.cli", "run", "--config", str(work / "controller.toml")),
            work / "controller.log",
        )
        procs.append(ctl)
        wait_for_port("127.0.0.1", port, 20, ctl)
        layout.ensure(DEMO_CGROUP)
        console.print(f"[bold]starting workload[/] in cgroup {DEMO_CGROUP}")
        procs.append(
            spawn(
                python_module("shadowctl.loadgen", "mixed", "--dir", str(work)),
                work / "loadgen.log",
                cgroup_procs=[d / "cgroup.procs" for d in layout.dirs(DEMO_CGROUP)],
            )
        )
        console.print("[bold]starting agent[/] (compiles its BPF programs first)")
        procs.append(
            spawn(
                python_module("agentd.cli", "run", "--config", str(work / "agentd.toml")), work / "agentd.log"
            )
        )
        channel = sync_channel(f"127.0.0.1:{port}", TlsConfig(plaintext=True))
        stub = FleetStub(channel)
        with channel, Live(_table([]), console=console, refresh_per_second=4) as live:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                live.update(_table(snapshot(stub, None, 5.0)))
                time.sleep(1.0)
        console.print("[bold]demo finished[/]; stopping everything")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            stop(p)
        if layout.exists(DEMO_CGROUP):
            layout.remove("/shadowplane-demo")
        shutil.rmtree(work, ignore_errors=True)
