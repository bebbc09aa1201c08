"""What the agent's capture costs a syscall-heavy workload.

Runs a syscall storm (`dd if=/dev/zero of=/dev/null bs=1 count=2000000`, ~4M syscalls) in a workload cgroup:
without capture, with empty raw tracepoints on sys_enter/sys_exit (the floor any syscall latency capture
pays), with the real agent daemon capturing that cgroup, and with the agent timing every syscall
(syscall_latency_sample_every = 1). Prints the runtime ratio, ns added per syscall, the agent's steady CPU%
and RSS, and the events it dropped. Needs root and BPF.

    .venv/bin/python bench/agent_overhead.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentd.capture.bpf_capture import unavailable_reason
from agentd.cgroupfs import CgroupLayout
from lab.procs import free_port, python_module, spawn, stop, wait_for_port

COUNT = 2_000_000
PLAINTEXT = "[tls]\nplaintext = true\n"  # loopback only
SYSCALLS = 2 * COUNT


def dd_seconds(procs_files: list[Path]) -> float:
    def enter() -> None:
        for f in procs_files:
            f.write_text(str(os.getpid()))

    out = subprocess.run(
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={COUNT}"],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"copied, ([0-9.]+) s", out.stderr)
    assert m, out.stderr
    return float(m.group(1))


def median_run(procs_files: list[Path], runs: int) -> float:
    return statistics.median(dd_seconds(procs_files) for _ in range(runs))


FLOOR = r"""
import sys, time
from bcc import BPF
b = BPF(text="RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }\nRAW_TRACEPOINT_PROBE(sys_exit) { return 0; }")
print("ready", flush=True)
sys.stdin.read()
"""


def with_floor(procs_files: list[Path], runs: int) -> float:
    p = subprocess.Popen(
        [sys.executable, "-c", FLOOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout and p.stdout.readline().strip() == "ready"
    try:
        return median_run(procs_files, runs)
    finally:
        p.kill()
        p.wait()


def with_agent(
    work: Path, cgroup: str, procs_files: list[Path], runs: int, sample_every: int
) -> dict[str, float]:
    port = free_port()
    (work / "c.toml").write_text(f'listen = "127.0.0.1:{port}"\n[store]\npath = "{work}/c.db"\n' + PLAINTEXT)
    (work / "a.toml").write_text(
        f'controller = "127.0.0.1:{port}"\nhost = "bench"\ninterval_seconds = 1.0\n'
        f"[capture]\nsyscall_latency_sample_every = {sample_every}\n"
        f'[[workload]]\nname = "storm"\ncgroup = "{cgroup}"\nrole = "primary"\nservice = "storm"\n'
        + PLAINTEXT
    )
    ctl = spawn(python_module("controller.cli", "run", "--config", str(work / "c.toml")), work / "c.log")
    agent = spawn(python_module("agentd.cli", "run", "--config", str(work / "a.toml")), work / "a.log")
    try:
        wait_for_port("127.0.0.1", port, 20, ctl)
        deadline = time.monotonic() + 30
        while "connected to controller" not in (work / "a.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not connect:\n" + (work / "a.log").read_text())
            time.sleep(0.1)
        ap = psutil.Process(agent.pid)
        t = median_run(procs_files, runs)
        # steady state: agent sampling every second with nothing special going on
        cpu0, t0 = sum(ap.cpu_times()[:2]), time.monotonic()
        time.sleep(10)
        cpu_pct = 100 * (sum(ap.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        rss = ap.memory_info().rss
        dropped = _dropped(port)
        return {"seconds": t, "cpu_pct": cpu_pct, "rss_mb": rss / 2**20, **dropped}
    finally:
        stop(agent)
        stop(ctl)


def _dropped(port: int) -> dict[str, float]:
    import grpc

    from shadowplane.v1 import fleet_pb2 as fpb
    from shadowplane.v1 import fleet_pb2_grpc as fgrpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        hosts = fgrpc.FleetStub(ch).ListHosts(fpb.ListHostsRequest(), timeout=5).hosts
    return {f"dropped:{k}": float(v) for h in hosts for k, v in h.capture.dropped_events.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot benchmark: {reason}")
        return 1
    layout = CgroupLayout.detect()
    cgroup = f"/sp-bench-{uuid.uuid4().hex[:6]}"
    layout.ensure(cgroup)
    procs_files = [d / "cgroup.procs" for d in layout.dirs(cgroup)]
    work = Path(tempfile.mkdtemp(prefix="sp-bench-"))
    try:
        base = median_run(procs_files, args.runs)
        floor = with_floor(procs_files, args.runs)
        agent8 = with_agent(work, cgroup, procs_files, args.runs, 8)
        agent1 = with_agent(work, cgroup, procs_files, args.runs, 1)
        base2 = median_run(procs_files, args.runs)
    finally:
        layout.remove(cgroup)
    base = (base + base2) / 2

    def row(name: str, t: float) -> str:
        return (
            f"{name:<52} {t:8.3f} s   ratio {t / base:5.2f}   +{(t - base) / SYSCALLS * 1e9:5.0f} ns/syscall"
        )

    print(
        f"syscall storm: dd bs=1 count={COUNT} ({SYSCALLS:,} syscalls), median of {args.runs} runs, "
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}"
    )
    print(row("no capture", base))
    print(row("empty raw tracepoints sys_enter+sys_exit (floor)", floor))
    print(row("agent, full capture, latency timed 1 in 8 (default)", agent8["seconds"]))
    print(row("agent, full capture, every syscall timed", agent1["seconds"]))
    print(f"agent steady CPU (1 s sampling interval): {agent8['cpu_pct']:.2f}% of one core")
    print(f"agent RSS after load: {agent8['rss_mb']:.1f} MB")
    dropped = {k.split(":", 1)[1]: int(v) for k, v in agent8.items() if k.startswith("dropped:")}
    print(f"dropped/missed events (exported in CaptureStatus.dropped_events): {dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
