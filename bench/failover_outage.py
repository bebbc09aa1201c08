"""Client-visible outage of a failover, Shadowplane against keepalived (VRRPv3), in the lab.

Shadowplane runs twice: with the shipped config defaults (lease, renewals, health checks, read from the
config dataclasses: what a fleet gets) and with the lab's fast timings; keepalived with its default
advert_int (1 s) and with 0.1 s. The README's headline is the shipped defaults' figure.

Each run: a client in the lab polls the service's VIP (a new HTTP GET every 10 ms, 200 ms timeout); the
VIP's current owner has its link cut; once the VIP answers from another host the link comes back and the run
waits until the service is stable again (Shadowplane: failback to the primary after the hold time;
keepalived: the primary preempts back). The outage is the time from the last successful request before the
failures to the first successful one after them (by send time). A checker samples every host's addresses
every 10 ms meanwhile and counts samples where two hosts hold the VIP (split brain).

keepalived runs on the same topology instead of the agents and the controller: one VRRPv3 instance per host
(primary priority 150, shadows 100 and 90), multicast adverts on the lab bridge.

    .venv/bin/python bench/failover_outage.py --system all --runs 10 [--out bench/results/failover_outage.txt]
    (--system defaults | lab | keepalived for one of them)

Needs root; leaves nothing behind (the lab is removed, also on failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import configs
from lab.poller import Record, outage_between, read_records
from lab.runner import Lab, LabError
from lab.spec import Spec, Timings, shipped_timings, timings_text
from lab.vipcheck import VipChecker

SETTLE_SECONDS = 0.5  # clean answers wanted before a cut, and after a recovery


@dataclass
class Run:
    owner: str
    new_owner: str = ""
    outage: float | None = None
    outages: int = 0
    failback_outage: float | None = None
    split_brain_samples: int = 0
    split_brain_in_failback: int = 0  # of those, samples taken after the link came back
    error: str = ""


@dataclass
class Result:
    system: str
    timings: str = ""
    bound: float | None = None  # Timings.max_failover_outage_seconds for Shadowplane
    runs: list[Run] = field(default_factory=list)
    samples: int = 0
    max_gap: float = 0.0
    error: str = ""

    def outages(self) -> list[float]:
        return [r.outage for r in self.runs if r.outage is not None]


def tail_records(path: Path) -> list[Record]:
    return read_records(path) if path.exists() else []


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def answered_by(path: Path, after: float, pred: Callable[[str], bool], count: int = 1) -> bool:
    ok = [r for r in tail_records(path) if r.ok and r.sent >= after and pred(r.responder)]
    return len(ok) >= count


def stable_answers(path: Path, since: float, seconds: float) -> bool:
    """Every request sent in the last `seconds` (and after `since`) succeeded, and there were some."""
    now = time.monotonic()
    recent = [
        r for r in tail_records(path) if r.sent >= max(since, now - seconds - 0.25) and r.sent <= now - 0.25
    ]
    return len(recent) >= seconds / 0.01 * 0.8 and all(r.ok for r in recent)


def start_keepalived(lab: Lab, advert_int: float) -> None:
    for h in lab.plan.fleet_hosts():
        conf = lab.workdir / f"keepalived-{h.name}.conf"
        conf.write_text(configs.keepalived_conf(lab.plan, h.name, advert_int))
        run = lab.workdir / f"keepalived-{h.name}"
        log = open(lab.workdir / "logs" / f"keepalived-{h.name}.log", "ab")  # noqa: SIM115 (child owns it)
        # -P: VRRP only (no health checker); own pid files, so instances in several namespaces do not
        # mistake each other for a running keepalived
        lab.popen_in(
            h.name,
            [
                "keepalived",
                "-n",
                "-l",
                "-P",
                "-f",
                str(conf),
                "-p",
                f"{run}.pid",
                "-r",
                f"{run}-vrrp.pid",
                "-c",
                f"{run}-checker.pid",
            ],
            name=f"keepalived-{h.name}",
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()


def one_run(lab: Lab, checker: VipChecker, i: int, system: str, hold: float) -> Run:
    svc = lab.service()
    primary = svc.primary
    owner = lab.wait_owner(None, None, 30)
    run = Run(owner)
    out = lab.workdir / f"poll-{system.replace(' ', '_')}-{i}.jsonl"
    url = lab.vip_url()
    poller = lab.popen_in(
        "client",
        [sys.executable, "-m", "lab.poller", "--url", url, "--out", str(out)],
        name=f"poller-{i}",
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    t_start = t_cut = t_restore = time.monotonic()
    before = checker.snapshot().split_brains
    try:
        wait_for(lambda: stable_answers(out, t_start, SETTLE_SECONDS), 15, f"the VIP answering from {owner}")
        before = checker.snapshot().split_brains
        t_cut = time.monotonic()
        lab.cut_link(owner)
        try:
            wait_for(
                lambda: answered_by(out, t_cut, lambda who: who != owner, count=5),
                30,
                "another host answering",
            )
            time.sleep(0.2)
        finally:
            t_restore = time.monotonic()
            lab.restore_link(owner)
        # requests sent just after the cut may still have got through: the new owner is the first other one
        others = [r for r in tail_records(out) if r.ok and r.sent >= t_cut and r.responder != owner]
        run.new_owner = min(others, key=lambda r: r.sent).responder if others else "?"
        # stable again: back on the primary (Shadowplane fails back after the hold; keepalived preempts)
        wait_for(
            lambda: answered_by(out, t_restore, lambda who: who == primary, count=1), hold + 30, "failback"
        )
        t_back = time.monotonic()
        wait_for(lambda: stable_answers(out, t_back, SETTLE_SECONDS), 15, "stable answers after failback")
        lab.wait_owner(None, primary, 10)
    except (TimeoutError, LabError) as e:
        run.error = str(e)
        t_restore = time.monotonic()
    finally:
        poller.send_signal(signal.SIGTERM)
        poller.wait(10)
    records = tail_records(out)
    run.outage, run.outages = outage_between(records, t_cut - 0.3, t_restore)
    run.failback_outage, _ = outage_between(records, t_restore, time.monotonic())
    new = checker.snapshot().split_brains[len(before) :]
    run.split_brain_samples = len(new)
    run.split_brain_in_failback = sum(1 for sb in new if sb.t >= t_restore)
    return run


def bench(system: str, runs: int, advert_int: float, hold: float) -> Result:
    timings = replace(Timings(), failback_hold_seconds=hold)
    if system == "defaults":
        timings = shipped_timings(timings)
    label = {"defaults": "shadowplane shipped defaults", "lab": "shadowplane lab timings"}.get(
        system, f"keepalived advert_int {advert_int:g}s"
    )
    shadowplane = system in ("defaults", "lab")
    res = Result(
        label,
        timings_text(timings) if shadowplane else "",
        round(timings.max_failover_outage_seconds(), 3) if shadowplane else None,
    )
    spec = Spec(failover="shadowplane" if shadowplane else "none", timings=timings)
    with Lab.up(spec) as lab:
        if system == "keepalived":
            start_keepalived(lab, advert_int)
        try:
            lab.wait_owner(None, lab.service().primary, 30)
        except LabError as e:
            st = lab.status()
            view = st["services"][0]["controller_view"]
            res.error = (
                f"the VIP never settled on the primary: {e}; controller says {view}"
                f" ({st['controller_error'] or 'no error'})"
            )
            return res
        checker = lab.vipcheck().start()
        try:
            for i in range(1, runs + 1):
                r = one_run(lab, checker, i, label, hold)
                res.runs.append(r)
                print(f"  {label} run {i}: {fmt_run(r)}", flush=True)
        finally:
            report = checker.stop()
            res.samples, res.max_gap = report.samples, report.max_gap
    return res


def fmt(v: float | None) -> str:
    return f"{v:.3f} s" if v is not None else "n/a"


def fmt_run(r: Run) -> str:
    text = (
        f"{r.owner} -> {r.new_owner or '?'}: outage {fmt(r.outage)}"
        f"{f' ({r.outages} windows)' if r.outages > 1 else ''}, failback outage {fmt(r.failback_outage)},"
        f" split-brain samples {r.split_brain_samples}"
        f"{f' ({r.split_brain_in_failback} during failback)' if r.split_brain_in_failback else ''}"
    )
    return text + (f"  ERROR: {r.error}" if r.error else "")


def summary(results: list[Result], runs: int) -> str:
    lines = [
        f"failover outage seen by a client polling the VIP every 10 ms (200 ms timeout), {runs} runs"
        " per system,"
        f" {os.cpu_count()} CPUs, kernel {os.uname().release}",
        f"{'system':<34} {'median':>9} {'max':>9} {'min':>9} {'split-brain samples':>20}  runs ok  bound",
    ]
    for res in results:
        if res.error:
            lines.append(f"{res.system:<34} not measured: {res.error}")
            continue
        o = res.outages()
        sb = sum(r.split_brain_samples for r in res.runs)
        med = fmt(statistics.median(o)) if o else "n/a"
        mx = fmt(max(o)) if o else "n/a"
        mn = fmt(min(o)) if o else "n/a"
        bound = fmt(res.bound) if res.bound is not None else "-"
        lines.append(
            f"{res.system:<34} {med:>9} {mx:>9} {mn:>9} {sb:>20}  {f'{len(o)}/{len(res.runs)}':>7}  {bound}"
        )
    for res in results:
        if res.timings:
            lines.append(f"{res.system}: {res.timings}")
    defaults = next((r for r in results if r.system.endswith("defaults") and r.outages()), None)
    for res in results:
        if defaults is not None and res is not defaults and res.outages():
            ratio = statistics.median(res.outages()) / statistics.median(defaults.outages())
            lines.append(f"{res.system}: median outage {ratio:.2f} x the shipped defaults'")
    for res in results:
        if res.runs:
            lines.append(
                f"{res.system}: per run (s): {', '.join(fmt(r.outage).removesuffix(' s') for r in res.runs)}"
                f"; checker {res.samples} samples, longest gap {res.max_gap * 1000:.0f} ms"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", choices=["defaults", "lab", "keepalived", "all"], default="all")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument(
        "--advert-int",
        type=float,
        action="append",
        help="keepalived advert_int, seconds (default: 1 and 0.1)",
    )
    ap.add_argument("--hold", type=float, default=2.0, help="Shadowplane failback hold, seconds")
    ap.add_argument("--out", type=Path, help="also write the summary here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds a lab in network namespaces: run it as root")
        return 1
    adverts = args.advert_int or [1.0, 0.1]
    plan: list[tuple[str, float]] = []
    if args.system in ("defaults", "all"):
        plan.append(("defaults", 0.0))
    if args.system in ("lab", "all"):
        plan.append(("lab", 0.0))
    if args.system in ("keepalived", "all"):
        plan += [("keepalived", a) for a in adverts]
    results = []
    for system, advert in plan:
        try:
            results.append(bench(system, args.runs, advert, args.hold))
        except LabError as e:
            results.append(Result(system, error=str(e)))
    text = summary(results, args.runs)
    print(text)
    if args.out:
        runs = [f"  {res.system} run {i}: {fmt_run(r)}" for res in results for i, r in enumerate(res.runs, 1)]
        args.out.write_text("\n".join([text, "", *runs]) + "\n")
    return 0 if all(not r.error for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
