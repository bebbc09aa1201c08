"""`shadowctl zones` (zone health) and `shadowctl pool plan` (the resource pool's placement, beside the
configured shadows and the alternatives, priced and counted the same way)."""

from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.table import Table

from shadowctl.client import fleet
from shadowctl.fleet_view import fmt_bytes
from shadowctl.terminal import console
from shadowplane.v1 import fleet_pb2 as fpb

# The solve runs up to pool.time_limit_seconds (5 s shipped) in the controller, plus its start.
PLAN_TIMEOUT_SECONDS = 120.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("zones", help="zone health: hosts down per zone, which zones are degraded and why")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=zones)
    pool = sub.add_parser("pool", help="the resource pool: shadow placement across zones").add_subparsers(
        dest="pool_cmd", required=True, metavar="SUBCOMMAND"
    )
    p = pool.add_parser(
        "plan",
        help="each service's shadow as the pool would place it, the reserve on every host, the failures "
        "covered and the price, beside the configured shadows and dedicated 1:1",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=plan)


def zones(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    with channel:
        resp = stub.ListZones(fpb.ListZonesRequest(), timeout=args.timeout)
    if args.json:
        print(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True), indent=2))
        return 0
    out = console()
    if not resp.zones:
        out.print("no zones: no [[host]] has a zone (or the controller is still in its placement grace)")
        return 0
    t = Table(title=f"zones (degraded at {resp.degraded_share:.0%} of hosts down)")
    for col in ("zone", "hosts", "down", "state", "why"):
        t.add_column(col)
    for z in resp.zones:
        state = "[red]degraded[/red]" if z.degraded else "ok"
        t.add_row(escape(z.zone), str(len(z.hosts)), ", ".join(z.down) or "-", state, escape(z.reason))
    out.print(t)
    return 0


def plan(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    with channel:
        resp = stub.GetPoolPlan(fpb.GetPoolPlanRequest(), timeout=max(args.timeout, PLAN_TIMEOUT_SECONDS))
    if args.json:
        print(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True), indent=2))
        return 0
    out = console()
    t = Table(title=f"placements (reserving for {escape(resp.demand)})")
    for col in (
        "placement",
        "price/h",
        "reserved cores",
        "host failures covered",
        "zone failures covered",
        "note",
    ):
        t.add_column(col)
    for c in resp.placements:
        t.add_row(
            escape(c.name),
            f"{c.price_per_hour:,.2f}",
            f"{c.reserved_cores:,.1f}",
            f"{c.host_covered}/{c.host_scenarios}",
            f"{c.zone_covered}/{c.zone_scenarios}",
            escape(c.note),
        )
    out.print(t)
    s = Table(title=f"services ({escape(resp.solver)}, {resp.solve_seconds:.2f} s)")
    for col in ("service", "zone", "tier", "demand", "shadow", "configured", "note"):
        s.add_column(col)
    for x in resp.services:
        changed = x.shadow and x.configured and x.shadow != x.configured
        s.add_row(
            escape(x.service),
            escape(x.zone),
            x.tier,
            f"{x.cpu_cores:.2f} cores, {fmt_bytes(x.memory_bytes)}" if x.primary else "-",
            (f"[yellow]{escape(x.shadow)}[/yellow]" if changed else escape(x.shadow)) or "-",
            escape(x.configured) or "-",
            escape(x.note),
        )
    out.print(s)
    r = Table(title="reserve per host (the pool's plan)")
    for col in ("host", "zone", "cores", "memory", "price/h", "worst failure"):
        r.add_column(col)
    for res in resp.reserves:
        r.add_row(
            escape(res.host),
            escape(res.zone),
            "whole host (dedicated)" if res.dedicated else f"{res.cores:.2f}",
            fmt_bytes(res.memory_bytes),
            f"{res.price_per_hour:,.2f}",
            escape(res.worst),
        )
    out.print(r)
    for c in resp.placements:
        for f in c.shortfalls[:20]:
            out.print(f"[red]{escape(c.name)} does not cover[/red] {escape(f)}")
    for note in resp.notes:
        out.print(f"note: {escape(note)}")
    return 0
