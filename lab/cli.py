"""`python -m lab up|down|status|scenario|demo`: a Shadowplane fleet in network namespaces on this machine.

Run from a checkout, as root. Not part of the packages: an installed host has no use for it (see README).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from lab.spec import MAX_CONTROLLERS, MAX_PRIMARIES, MAX_SHADOWS, Spec, Timings, shipped_timings, timings_text
from shadowplane import logs

PROG = "python -m lab"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="a test fleet in network namespaces on this machine (root)"
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    lab_sub = p.add_subparsers(dest="lab_cmd", required=True, metavar="SUBCOMMAND")

    up = lab_sub.add_parser("up", help="build the lab and start its controller, agents and web servers")
    up.add_argument(
        "--primaries", type=int, default=1, help=f"primary hosts, one service each (1-{MAX_PRIMARIES})"
    )
    up.add_argument(
        "--shadows", type=int, default=2, help=f"shadow hosts, shared by every service (1-{MAX_SHADOWS})"
    )
    up.add_argument(
        "--zones",
        type=int,
        default=2,
        choices=(2, 3),
        help="availability zones: 2 alternates hosts between az1 and az2; 3 puts p<i> and s<i> in "
        "az<(i-1)%%3+1>, a primary with some of its shadows",
    )
    up.add_argument(
        "--controllers",
        type=int,
        default=1,
        help=f"controller replicas (1-{MAX_CONTROLLERS}): above 1, as many etcd members and replicas, one of "
        "each per controller namespace, coordinated as [cluster] does (needs 2 or more shadows)",
    )
    up.add_argument(
        "--shards",
        type=int,
        default=1,
        help="the services' shards ([cluster] shards), divided among the replicas (with --controllers)",
    )
    up.add_argument("--dns", action="store_true", help="add a DNS server host (BIND) taking RFC 2136 updates")
    up.add_argument("--ipv6", action="store_true", help="IPv6 VIPs (fd77::101, ...) instead of IPv4")
    up.add_argument("--no-failover", action="store_true", help="namespaces and web servers only")
    up.add_argument("--failback-hold", type=float, default=Timings.failback_hold_seconds, metavar="SECONDS")
    up.add_argument("--flap-window", type=float, default=Timings.flap_window_seconds, metavar="SECONDS")
    up.add_argument(
        "--agent-interval",
        type=float,
        default=Timings.agent_interval_seconds,
        metavar="SECONDS",
        help="agents' telemetry interval",
    )
    up.add_argument(
        "--scaling-interval",
        type=float,
        default=Timings.scaling_interval_seconds,
        metavar="SECONDS",
        help="the controller's scaling interval, also its forecast step in the lab (time compressed)",
    )
    up.add_argument(
        "--lower-hold",
        type=float,
        default=Timings.scaling_lower_hold_seconds,
        metavar="SECONDS",
        help="scaling.lower_hold_seconds, in the model's time (production's default: 14400)",
    )
    up.add_argument(
        "--max-changes-per-day",
        type=int,
        default=Timings.scaling_max_changes_per_day,
        metavar="N",
        help="scaling.max_changes_per_day, a day of the model's time (production's default: 7; the lab: 0, "
        "no budget)",
    )
    up.add_argument("--bpf", action="store_true", help="agents capture with BPF (slow to start)")
    up.add_argument(
        "--plaintext",
        action="store_true",
        help="no TLS anywhere (default: mutual TLS with a fleet CA made for this lab, as in production)",
    )
    up.add_argument(
        "--workdir", type=Path, help="configs and logs here (default: under /run/shadowplane-lab)"
    )
    up.add_argument("--no-wait", action="store_true", help="do not wait for the agents to connect")
    up.add_argument("--json", action="store_true", help="print the status as JSON once up")
    up.set_defaults(func=lab_up)

    down = lab_sub.add_parser("down", help="stop and remove everything a lab made (also after a crash)")
    down.add_argument("--keep-logs", action="store_true", help="keep the work directory (configs, logs)")
    down.set_defaults(func=lab_down)

    st = lab_sub.add_parser("status", help="hosts, processes, and who holds each VIP")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=lab_status)

    demo = lab_sub.add_parser(
        "demo", help="the whole system in under 3 minutes: lab, daily demand, failover, failback, summary"
    )
    demo.add_argument("--day", type=float, default=75.0, help="seconds the compressed day of demand lasts")
    demo.add_argument("--hold", type=float, default=5.0, help="failback hold time, seconds")
    demo.add_argument("--json", action="store_true", help="also print the summary as JSON (last line)")
    demo.set_defaults(func=lab_demo)

    ch = lab_sub.add_parser(
        "chaos",
        help="fault injection: builds its own lab, injects faults, prints two-owner samples, outages, "
        "false failovers, losses and dead daemons per scenario",
    )
    which = ch.add_mutually_exclusive_group()
    which.add_argument("--scenario", action="append", metavar="NAME", help="run this one (repeatable)")
    which.add_argument("--random", action="store_true", help="a random schedule of every scenario")
    which.add_argument("--list", action="store_true", help="list the scenarios and what each injects")
    ch.add_argument("--minutes", type=float, default=5.0, help="--random: how long")
    ch.add_argument("--seed", type=int, default=1, help="--random: the schedule's seed")
    ch.add_argument("--quick", action="store_true", help="short faults (the test suite's durations)")
    ch.add_argument("--plaintext", action="store_true", help="a lab without TLS")
    ch.add_argument(
        "--timings",
        choices=["lab", "defaults"],
        default="lab",
        help="the lab's fast timings, or the shipped config defaults (lease, renewals, checks)",
    )
    ch.add_argument("--lease", type=float, metavar="SECONDS", help="override: lease_seconds")
    ch.add_argument("--renew", type=float, metavar="SECONDS", help="override: renew_interval_seconds")
    ch.add_argument("--health-interval", type=float, metavar="SECONDS", help="override: health interval")
    ch.add_argument("--health-timeout", type=float, metavar="SECONDS", help="override: health timeout")
    ch.add_argument("--fall", type=int, help="override: health checks failed in a row that make a host down")
    ch.add_argument(
        "--shadows",
        type=int,
        default=2,
        help="shadows of the service (1: the default quorum is the controller, the primary and the shadow)",
    )
    ch.add_argument("--json", action="store_true", help="one JSON object per scenario, then the totals")
    ch.set_defaults(func=lab_chaos)

    sc = lab_sub.add_parser("scenario", help="run a demand scenario on the lab that is up")
    sc_sub = sc.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    step = sc_sub.add_parser(
        "step-load",
        help="primary CPU demand steps up, then down: timeline of demand, forecast, shadow limits",
    )
    step.add_argument("--baseline", type=float, default=0.1, help="cores before and after the step")
    step.add_argument("--high", type=float, default=0.8, help="cores during the step")
    step.add_argument("--before", type=float, default=20.0, help="seconds at baseline first")
    step.add_argument("--during", type=float, default=30.0, help="seconds at the high level")
    step.add_argument("--after", type=float, default=40.0, help="seconds at baseline afterwards")
    step.add_argument("--sample", type=float, default=1.0, help="seconds between timeline rows")
    step.add_argument("--json", action="store_true", help="one JSON object per row")
    step.set_defaults(func=lab_step_load)
    rp = sc_sub.add_parser(
        "replay",
        help="a real trace as the primary's CPU demand, time compressed: the shadow's real limit scored "
        "against the measured demand, beside the backtest",
    )
    rp.add_argument("--trace", type=Path, required=True, metavar="FILE.csv", help="CSV timestamp,value")
    rp.add_argument(
        "--speed",
        type=float,
        required=True,
        help="trace seconds per real second: the trace's step over the lab's forecast step (its scaling "
        "interval), e.g. 150 for a 300 s trace on the default lab",
    )
    rp.add_argument("--peak-cores", type=float, default=1.0, help="the replayed rows' peak, in cores")
    rp.add_argument("--start-row", type=int, default=0, help="first trace row to replay")
    rp.add_argument("--warmup-rows", type=int, default=288, help="rows replayed but not scored (a day)")
    rp.add_argument("--rows", type=int, default=288, help="rows scored after the warm-up")
    rp.add_argument("--json", action="store_true", help="one JSON object per step, then the report")
    rp.set_defaults(func=lab_replay)
    return p


def _err(msg: str) -> int:
    print(f"lab: {msg}", file=sys.stderr)
    return 1


def lab_up(args: argparse.Namespace) -> int:
    from lab.runner import Lab, LabError

    timings = replace(
        Timings(),
        failback_hold_seconds=args.failback_hold,
        flap_window_seconds=args.flap_window,
        agent_interval_seconds=args.agent_interval,
        scaling_interval_seconds=args.scaling_interval,
        scaling_lower_hold_seconds=args.lower_hold,
        scaling_max_changes_per_day=args.max_changes_per_day,
    )
    spec = Spec(
        primaries=args.primaries,
        shadows=args.shadows,
        zones=args.zones,
        controllers=args.controllers,
        shards=args.shards,
        dns=args.dns,
        ipv6_vips=args.ipv6,
        failover="none" if args.no_failover else "shadowplane",
        agent_bpf=args.bpf,
        plaintext=args.plaintext,
        timings=timings,
        workdir=args.workdir,
    )
    try:
        lab = Lab.up(spec, wait=not args.no_wait)
        status = lab.status()
    except LabError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return _err("interrupted; everything made so far was removed")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
        print(f"\nlab is up; logs in {status['workdir']}/logs; remove it with `python -m lab down`")
    return 0


def lab_demo(args: argparse.Namespace) -> int:
    from lab.demo import run_demo, summary_dict
    from lab.runner import LabError

    try:
        summary = run_demo(args.day, args.hold)
    except (LabError, TimeoutError) as e:
        return _err(f"demo failed: {e} (everything it made was removed)")
    except KeyboardInterrupt:
        return _err("interrupted; everything the demo made was removed")
    if args.json:
        print(json.dumps(summary_dict(summary)))
    return 0 if not summary.left_behind else 1


def lab_step_load(args: argparse.Namespace) -> int:
    from lab.runner import Lab, LabError
    from lab.scenario import HEADER, Row, row_dict, row_text, step_load

    def show(r: Row) -> None:
        print(json.dumps(row_dict(r)) if args.json else row_text(r), flush=True)

    try:
        lab = Lab.attach()
        if not args.json:
            print(f"shadow cgroup: {lab.service().cgroup(lab.service().shadows[0])}\n{HEADER}", flush=True)
        try:
            step_load(lab, args.baseline, args.high, args.before, args.during, args.after, args.sample, show)
        finally:
            lab._close_grpc()
    except LabError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return _err("interrupted")
    return 0


def lab_replay(args: argparse.Namespace) -> int:
    from lab.replay import ReplayStep, replay, report_dict
    from lab.runner import Lab, LabError
    from training.traces import TraceError, load_trace

    if args.speed <= 0 or args.peak_cores <= 0 or args.warmup_rows < 0 or args.rows < 1 or args.start_row < 0:
        return _err("--speed and --peak-cores must be > 0, --rows >= 1, --warmup-rows and --start-row >= 0")
    try:
        trace = load_trace(args.trace)
    except TraceError as e:
        return _err(str(e))

    def show(s: ReplayStep) -> None:
        if args.json:
            print(json.dumps(s.__dict__), flush=True)
        elif (s.row - args.start_row) % 12 == 0:
            limit = s.shadow_cpu_limit_cores
            print(f"row {s.row:6d}  asked {s.asked_cores:5.2f} cores  shadow limit {limit:5.2f}", flush=True)

    try:
        lab = Lab.attach()
        try:
            r = replay(
                lab, trace, args.speed, args.peak_cores, args.start_row, args.warmup_rows, args.rows, show
            )
        finally:
            lab._close_grpc()
    except LabError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return _err("interrupted")
    print(json.dumps(report_dict(r)) if args.json else r.text())
    return 0


def chaos_timings(args: argparse.Namespace) -> Timings:
    t = shipped_timings() if args.timings == "defaults" else Timings()
    overrides = {
        "lease_seconds": args.lease,
        "renew_interval_seconds": args.renew,
        "health_interval_seconds": args.health_interval,
        "health_timeout_seconds": args.health_timeout,
        "health_fall": args.fall,
    }
    return replace(t, **{k: v for k, v in overrides.items() if v is not None})


def lab_chaos(args: argparse.Namespace) -> int:
    from lab import chaos
    from lab.runner import LabError

    if args.list:
        for s in chaos.SCENARIOS:
            print(f"{s.name:<34} {s.what}")
        return 0
    try:
        chosen: Any = (
            chaos.random_schedule(args.minutes, args.seed)
            if args.random
            else [chaos.scenario(n) for n in args.scenario]
            if args.scenario
            else list(chaos.SCENARIOS)
        )
    except KeyError as e:
        return _err(str(e.args[0]))

    def show(f: chaos.Figures) -> None:
        print(json.dumps(chaos.figures_json(f)) if args.json else chaos.row(f), flush=True)

    if not args.json:
        print(chaos.HEADER, flush=True)
    spec = chaos.chaos_spec(chaos_timings(args), args.plaintext, args.shadows)
    if not args.json:
        print(f"timings: {timings_text(spec.timings)}", flush=True)
    try:
        figs = chaos.run_scenarios(chosen, args.quick, show, spec)
    except LabError as e:
        return _err(f"chaos: {e} (everything it made was removed)")
    except KeyboardInterrupt:
        return _err("interrupted; everything the chaos run made was removed")
    t = chaos.totals(figs)
    if args.json:
        print(json.dumps({"totals": asdict(t)}))
    else:
        print(
            f"\n{t.scenarios} scenarios: {t.two_owner_samples} samples with two owners, {t.false_failovers}"
            f" false failovers, {t.rogue_grants} rogue renewals granted, {t.outages_over_bound} outages over"
            f" their bound, {t.events_lost} events and"
            f" {t.telemetry_lost} telemetry intervals lost, {t.daemons_died} daemons died"
        )
    return 0 if t.two_owner_samples == t.false_failovers == t.rogue_grants == 0 else 1


def lab_down(args: argparse.Namespace) -> int:
    from lab.runner import LabError, down_all

    try:
        removed = down_all(keep_workdir=args.keep_logs)
    except LabError as e:
        return _err(str(e))
    if not removed:
        print("no lab found: nothing to remove")
    for line in removed:
        print(f"removed {line}")
    return 0


def lab_status(args: argparse.Namespace) -> int:
    from lab.runner import Lab, LabError

    try:
        lab = Lab.attach()
        try:
            status = lab.status()
        finally:
            lab._close_grpc()
    except LabError as e:
        return _err(str(e))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def _print_status(st: dict[str, Any]) -> None:
    # piped output keeps whole rows rather than wrapping at rich's default 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200)
    t = Table("HOST", "ROLE", "NAMESPACE", "ADDRESSES", "PORT", "PROCESSES", "ALIVE", box=None)
    for h in st["hosts"]:
        procs = ", ".join(f"{k} {v}" for k, v in h["processes"].items()) or "-"
        t.add_row(
            h["name"],
            h["role"],
            h["namespace"],
            " ".join(h["addresses"]),
            h["bridge_port"],
            procs,
            "yes" if h["alive"] else "NO",
        )
    console.print(t)
    s = Table("SERVICE", "VIP", "PRIMARY", "SHADOWS", "OWNER (addresses)", "CONTROLLER SAYS", box=None)
    for svc in st["services"]:
        owners = svc["owners"]
        owner = "-" if not owners else owners[0] if len(owners) == 1 else "SPLIT: " + ", ".join(owners)
        view = svc["controller_view"]
        said = f"{view['owner'] or '-'} (token {view['token']}, {view['phase']})" if view else "-"
        s.add_row(svc["name"], svc["vip"], svc["primary"], ", ".join(svc["shadows"]), owner, said)
    console.print(s)
    if st.get("controller_error"):
        print(f"controller: {st['controller_error']}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level)
    try:
        return int(args.func(args))
    except grpc.RpcError as e:  # a call to the lab's controller failed outside the commands' own checks
        code = e.code().name if isinstance(e, grpc.Call) else "error"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        return _err(f"the lab's controller: {code}: {details} (`{PROG} status` shows what is running)")
