"""`shadowctl hosts` and `shadowctl top`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rich.live import Live
from rich.table import Table

from shadowctl.client import fleet
from shadowctl.fleet_view import ROLE, fmt_bytes, fmt_seconds, host_row, sample_row
from shadowctl.terminal import console, interactive
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("hosts", help="list hosts and their health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=hosts)
    p = sub.add_parser("top", help="live table of every workload's latest telemetry")
    p.add_argument("host", nargs="?", help="only this host")
    p.add_argument("--json", action="store_true", help="print snapshots as JSON (one per line)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument(
        "--iterations",
        type=int,
        default=0,
        help="stop after N refreshes (default: forever on a terminal; 1 with --json or without a terminal)",
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (--iterations 1)")
    p.set_defaults(func=top)


def hosts(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    with channel:
        resp = stub.ListHosts(fpb.ListHostsRequest(), timeout=args.timeout)
    rows = [host_row(h) for h in resp.hosts]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table("HOST", "HEALTH", "ZONE", "WORKLOADS", "BPF", "LAST SEEN", "PEER", box=None)
    for r in rows:
        wl = ", ".join(f"{w['name']}({w['role']})" for w in r["workloads"]) or "-"
        missing = [f for f in r["capture_features"] if not f["captured"]]
        bpf = ("on" + (f" ({len(missing)} not captured)" if missing else "")) if r["bpf"] else "off"
        seen = f"{r['last_seen_seconds_ago']}s ago" if r["last_seen_seconds_ago"] is not None else "-"
        t.add_row(r["host"], r["health"], r["zone"] or "-", wl, bpf, seen, r["peer"])
    console().print(t)
    for r in rows:
        if not r["bpf"] and r["bpf_unavailable_reason"]:
            print(f"{r['host']}: BPF off: {r['bpf_unavailable_reason']}")
        for f in r["capture_features"]:
            if not f["captured"]:
                print(f"{r['host']}: not captured on this kernel: {f['name']}: {f['detail']}")
    return 0


def snapshot(stub: fgrpc.FleetStub, host: str | None, timeout: float) -> list[dict[str, Any]]:
    """The latest sample of every workload (of one host, or all)."""
    listed = stub.ListHosts(fpb.ListHostsRequest(), timeout=timeout).hosts
    rows = []
    for h in listed:
        if host and h.host != host:
            continue
        roles = {w.name: ROLE.get(w.role, "?") for w in h.workloads}
        resp = stub.GetTelemetry(fpb.GetTelemetryRequest(host=h.host, limit=1), timeout=timeout)
        for s in resp.samples:
            rows.append(sample_row(h.host, roles.get(s.sample.workload, "?"), s.sample))
    return rows


def _table(rows: list[dict[str, Any]]) -> Table:
    t = Table(
        "HOST",
        "WORKLOAD",
        "ROLE",
        "CPU",
        "MEM",
        "SYSCALL/s",
        "TOP SYSCALLS",
        "SYS p99",
        "DISK op/s",
        "DISK p99",
        "SRTT p50",
        "RETRANS",
        "AGE",
        title="shadowctl top",
        box=None,
    )
    for r in rows:
        top = ", ".join(f"{k} {v:.0f}" for k, v in r["top_syscalls"].items())
        t.add_row(
            r["host"],
            r["workload"],
            r["role"],
            f"{r['cpu_cores']:.2f}",
            fmt_bytes(r["memory_bytes"]),
            f"{r['syscalls_per_second']:.0f}",
            top or "-",
            fmt_seconds(r["syscall_latency_p99_seconds"]),
            f"{r['disk_ops_per_second']:.0f}",
            fmt_seconds(r["disk_latency_p99_seconds"]),
            fmt_seconds(r["tcp_srtt_p50_seconds"]),
            str(r["tcp_retransmits"]),
            f"{r['age_seconds']:.0f}s",
        )
    return t


def top(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    live = interactive() and not args.json
    # Refreshing in place needs a terminal; into a pipe or a file (a script, cron, `| less`) a table that
    # never ends would print nothing: one snapshot then, unless asked for more.
    iterations = 1 if args.once else args.iterations or (0 if live else 1)
    n = 0
    with channel:
        try:
            if not live:
                while True:
                    rows = snapshot(stub, args.host, args.timeout)
                    if args.json:
                        print(json.dumps(rows), flush=True)
                    else:
                        console().print(_table(rows))
                        sys.stdout.flush()
                    n += 1
                    if iterations and n >= iterations:
                        return 0
                    time.sleep(args.interval)
            with Live(_table([]), console=console(), refresh_per_second=4, screen=False) as screen:
                while True:
                    screen.update(_table(snapshot(stub, args.host, args.timeout)))
                    n += 1
                    if iterations and n >= iterations:
                        return 0
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
