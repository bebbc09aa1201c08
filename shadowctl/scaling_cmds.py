"""`shadowctl plan`, and the operator's holds on a shadow: `pin`, `bound`, `freeze`, `unfreeze`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.table import Table

from shadowctl.client import fleet
from shadowctl.fleet_view import fmt_bytes
from shadowctl.terminal import console
from shadowplane.v1 import fleet_pb2 as fpb

UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'512M', '2g', '1048576' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in UNITS else ""
    number = t[:-1] if unit else t
    try:
        value = float(number) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plan", help="the next and the last scaling decisions (per shadow and resource)")
    p.add_argument("workload", nargs="?", default="", help="HOST/WORKLOAD or a service name")
    p.add_argument("--last", type=int, default=5, help="past decisions per shadow and resource")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=plan)
    for kind, text in (
        ("pin", "hold a shadow's limits at fixed values"),
        ("bound", "keep a shadow's limits within a range"),
        ("freeze", "keep a shadow's limits as they are now"),
        ("unfreeze", "drop any pin, bound or freeze: back to the forecast"),
    ):
        q = sub.add_parser(kind, help=text)
        q.add_argument("workload", help="HOST/WORKLOAD of a shadow")
        q.add_argument("--reason", default="")
        if kind == "pin":
            q.add_argument("--cpu", type=float, default=0.0, help="cores")
            q.add_argument("--memory", type=parse_bytes, default=0, help="bytes (512M, 2G)")
        if kind == "bound":
            q.add_argument("--cpu-min", type=float, default=0.0)
            q.add_argument("--cpu-max", type=float, default=0.0)
            q.add_argument("--memory-min", type=parse_bytes, default=0)
            q.add_argument("--memory-max", type=parse_bytes, default=0)
        q.set_defaults(func=override, kind=kind)


def _value(resource: str, v: float) -> str:
    return f"{v:.3f}" if resource == "cpu" else fmt_bytes(v)


def _when(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def plan(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    with channel:
        resp = stub.GetPlan(fpb.GetPlanRequest(workload=args.workload, last=args.last), timeout=args.timeout)
    if args.json:
        doc: dict[str, Any] = MessageToDict(resp, preserving_proto_field_name=True)
        print(json.dumps(doc, indent=2))
        return 0
    out = console()
    t = Table("SHADOW", "SERVICE", "READY", "LIMITS NOW", "OVERRIDE", title="shadows", box=None)
    for s in resp.shadows:
        over = (
            s.override.kind + (f" ({s.override.reason})" if s.override.reason else "")
            if s.override.kind
            else "-"
        )
        t.add_row(
            f"{s.host}/{s.workload}",
            s.service,
            "yes" if s.ready else f"NO: {s.reason}",
            f"{s.cpu_cores:.3f} cores, {fmt_bytes(s.memory_bytes)}",
            over,
        )
    out.print(t)
    for title, rows in (
        (f"next (cycle at {_when(resp.next_cycle_unix_ms)})", resp.next),
        ("last", resp.last),
    ):
        t = Table(
            "TIME",
            "SHADOW",
            "RES",
            "DEMAND FROM",
            "q0.5",
            "q0.99",
            "TARGET",
            "OLD",
            "NEW",
            "BRANCH",
            "RESULT",
            title=title,
            box=None,
        )
        for d in rows:
            f = d.forecast
            t.add_row(
                _when(d.unix_ms),
                f"{d.host}/{d.workload}",
                d.resource,
                d.demand_from,
                _value(d.resource, f.get("q0.5", 0)),
                _value(d.resource, f.get("q0.99", 0)),
                _value(d.resource, d.predicted),
                _value(d.resource, d.old),
                _value(d.resource, d.new),
                # escaped: rich would take "[floor]" for markup and print nothing
                escape(d.branch + (f" [{d.clamps}]" if d.clamps else "")),
                d.result,
            )
        out.print(t)
    return 0


def override(args: argparse.Namespace) -> int:
    host, _, workload = args.workload.partition("/")
    if not workload:
        print("shadowctl: give the shadow as HOST/WORKLOAD (see shadowctl plan)", file=sys.stderr)
        return 2
    kind = "clear" if args.kind == "unfreeze" else args.kind
    o = fpb.Override(host=host, workload=workload, kind=kind, reason=args.reason)
    if kind == "pin":
        o.cpu_cores, o.memory_bytes = args.cpu, args.memory
    if kind == "bound":
        o.cpu_min, o.cpu_max, o.memory_min, o.memory_max = (
            args.cpu_min,
            args.cpu_max,
            args.memory_min,
            args.memory_max,
        )
    channel, stub = fleet(args)
    with channel:
        r = stub.SetOverride(o, timeout=args.timeout)
    print(("accepted: " if r.accepted else "refused: ") + r.reason)
    return 0 if r.accepted else 3
