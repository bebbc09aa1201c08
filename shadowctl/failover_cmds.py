"""`shadowctl services`, `failover`, `failback` and `events`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from controller.failover.decide import NO_SHADOW
from shadowctl.client import fleet
from shadowctl.terminal import console
from shadowplane.v1 import fleet_pb2 as fpb


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("services", help="each service: owner, token, health per observer, last transition")
    p.add_argument("service", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=services)
    p = sub.add_parser("failover", help="move a service to a shadow now")
    p.add_argument("service")
    p.add_argument("--to", default="", help="this host (default: the best ready shadow)")
    p.add_argument("--force", action="store_true", help="ignore flap damping")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=failover)
    p = sub.add_parser("failback", help="move a service back to its primary now")
    p.add_argument("service")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=failback)
    p = sub.add_parser("events", help="decisions and transitions, with their reasons (follows with -f)")
    p.add_argument("service", nargs="?", default="")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new events")
    p.add_argument("-n", "--limit", type=int, default=30)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=events)


def service_dict(s: fpb.ServiceStatus) -> dict[str, Any]:
    return {
        "name": s.name,
        "vip": s.vip,
        "primary": s.primary,
        "shadows": list(s.shadows),
        "owner": s.owner or None,
        "token": s.token,
        "phase": s.phase,
        "failback": s.failback,
        # a service without shadows is watched only: say so rather than let an empty list be read as a fault
        "failover": "enabled" if s.shadows else NO_SHADOW,
        "primary_healthy_since_unix_ms": s.primary_healthy_since_unix_ms or None,
        "observers": [
            {"observer": o.observer, "target": o.target, "up": o.up if o.known else None, "detail": o.detail}
            for o in s.observers
        ],
        "last_transition": event_dict(s.last_transition) if s.last_transition.id else None,
    }


def event_dict(e: fpb.Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "unix_ms": e.unix_ms,
        "kind": e.kind,
        "service": e.service,
        "host": e.host,
        "reason": e.reason,
        "detail": dict(e.detail),
    }


def services(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    with channel:
        resp = stub.ListServices(fpb.ListServicesRequest(service=args.service or ""), timeout=args.timeout)
    rows = [service_dict(s) for s in resp.services]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    out = console()
    if resp.controller:
        out.print(escape(f"controller replica {resp.controller}"))
    for r in rows:
        t = Table(
            title=f"{r['name']}  vip {r['vip'] or '-'}  owner {r['owner'] or 'NOBODY'}  token {r['token']}"
            f"  phase {r['phase']}  " + (f"failback {r['failback']}" if r["shadows"] else escape(NO_SHADOW)),
            box=None,
        )
        t.add_column("TARGET")
        observers = sorted({o["observer"] for o in r["observers"]})
        for o in observers:
            t.add_column(o.upper())
        for target in [r["primary"], *r["shadows"]]:
            cells = []
            for o in observers:
                v = next((x for x in r["observers"] if x["observer"] == o and x["target"] == target), None)
                cells.append(
                    "self" if v is None else ("?" if v["up"] is None else ("up" if v["up"] else "DOWN"))
                )
            role = "primary" if target == r["primary"] else "shadow"
            t.add_row(f"{target} ({role})", *cells)
        out.print(t)
        if r["last_transition"]:
            last = r["last_transition"]
            # reasons quote config sections ("[service.dns]"), which rich would take for markup
            out.print(escape(f"  last transition: {_ago(last['unix_ms'])}: {last['kind']} {last['reason']}"))
    return 0


def _transition(args: argparse.Namespace, call: str, req: Any) -> int:
    channel, stub = fleet(args)
    with channel:
        resp = getattr(stub, call)(req, timeout=args.timeout)
    if args.json:
        print(json.dumps({"accepted": resp.accepted, "reason": resp.reason}))
    else:
        print(("accepted: " if resp.accepted else "refused: ") + resp.reason)
    return 0 if resp.accepted else 3


def failover(args: argparse.Namespace) -> int:
    return _transition(
        args, "Failover", fpb.FailoverRequest(service=args.service, to=args.to, force=args.force)
    )


def failback(args: argparse.Namespace) -> int:
    return _transition(args, "Failback", fpb.FailbackRequest(service=args.service))


def _ago(unix_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_ms / 1000)) + f".{unix_ms % 1000:03d}"


def _print_event(e: fpb.Event, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event_dict(e)), flush=True)
        return
    detail = " ".join(f"{k}={v}" for k, v in sorted(e.detail.items()))
    host = f" @{e.host}" if e.host else ""
    print(
        f"{_ago(e.unix_ms)} {e.kind:<18} {e.service}{host}: {e.reason}" + (f"  [{detail}]" if detail else ""),
        flush=True,
    )


def events(args: argparse.Namespace) -> int:
    channel, stub = fleet(args)
    req = fpb.ListEventsRequest(service=args.service, limit=args.limit)
    with channel:
        try:
            if args.follow:
                for ev in stub.WatchEvents(req):
                    _print_event(ev, args.json)
            else:
                for ev in stub.ListEvents(req, timeout=args.timeout).events:
                    _print_event(ev, args.json)
        except KeyboardInterrupt:
            return 0
    return 0
