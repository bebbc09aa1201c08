"""Controller replicas in the lab, measured on the production code path: `lab up --controllers 3` (3 etcd
members and 3 replicas, one of each per controller namespace, mutual TLS; agents streaming to every
replica), the replicas' shipped cluster defaults (leader key TTL 3 s, margin 0.1) and the lab's failover
timings (printed), a client polling the VIP every 10 ms and every host's addresses sampled every 10 ms.

    .venv/bin/python bench/replica_failover.py [--trials 5] [--out bench/results/replica_failover.txt]

Per trial, in one run (these machines differ 3x in speed, so the figure that compares is a ratio):
  leader  kill -9 of the acting leader: time until another replica acts (from its log: "acting as
          leader"), and the client's outage (none expected: leases live between agents);
  base    the primary's link cut with a steady leader: the client's outage (the usual failover);
  during  the primary's link cut at the same moment as the leader is killed: the client's outage.
Reported: medians and ranges, during / base, and address samples with two owners (must be 0).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.cluster.leadership import DEFAULT_MARGIN, DEFAULT_TTL_SECONDS
from lab.configs import controller_process
from lab.poller import outages
from lab.runner import Lab
from lab.spec import Spec, Timings, timings_text
from shadowplane.v1 import fleet_pb2 as fpb

REPLICAS = ("ctl", "ctl2", "ctl3")
ACTING = re.compile(
    r"^(\S+ \S+) INFO controller\.cluster\.replica: (\S+): shared state read; acting as leader"
)


def settle(lab: Lab) -> None:
    for h in REPLICAS:
        if not lab.alive(controller_process(h)):
            lab.restart(controller_process(h))
    lab.restore_link("p1")
    lab.leader(30)
    lab.wait_owner(None, "p1", 60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        views: list[fpb.ServiceStatus | None] = []
        for h in REPLICAS:
            try:
                views.append(lab.fleet(h).ListServices(fpb.ListServicesRequest(), timeout=1).services[0])
            except Exception:
                views.append(None)
        if all(v is not None and (v.owner, v.phase) == ("p1", "stable") for v in views):
            time.sleep(1.0)
            return
        time.sleep(0.1)
    raise RuntimeError("the lab did not settle on p1")


def acting_at(lab: Lab, replica: str, after_wall: float) -> float | None:
    """Wall time of `replica`'s first "acting as leader" after `after_wall`, from its log."""
    for line in lab.logs(controller_process(replica)).splitlines():
        m = ACTING.match(line)
        if m and m.group(2) == replica:
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=dt.UTC).timestamp()
            if t >= after_wall:
                return t
    return None


def measured(lab: Lab, fault: Callable[[], object], until: Callable[[], object]) -> tuple[float, int, int]:
    """(longest client outage s, two-owner samples, address samples) around `fault` until `until` returns."""
    poller, checker = lab.poller().start(), lab.vipcheck().start()
    try:
        time.sleep(0.5)
        fault()
        until()
        time.sleep(1.0)
    finally:
        records, report = poller.stop(), checker.stop()
    gaps = [o.duration for o in outages(records) if o.duration is not None]
    return max(gaps, default=0.0), len(report.split_brains), report.samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    timings = Timings(failback_hold_seconds=2.0)
    lines = [
        f"# bench/replica_failover.py --trials {args.trials}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}",
        f"cluster defaults: leader key TTL {DEFAULT_TTL_SECONDS} s, margin {DEFAULT_MARGIN}; lab: 3 etcd "
        "members + 3 replicas, mutual TLS; client polls every 10 ms, addresses sampled every 10 ms",
        f"lab timings: {timings_text(timings)}",
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)
    leader_s: list[float] = []
    leader_outage: list[float] = []
    base: list[float] = []
    during: list[float] = []
    two_owners = samples = 0
    with Lab.up(Spec(controllers=3, timings=timings)) as lab:
        settle(lab)
        for trial in range(1, args.trials + 1):
            # leader: kill -9, nothing else
            killed = old = lab.leader()
            wall = time.time()
            out, bad, n = measured(
                lab,
                functools.partial(lab.signal, controller_process(old), signal.SIGKILL),
                functools.partial(wait_new_leader, lab, old),
            )
            new = lab.leader()
            t = acting_at(lab, new, wall)
            took = (t - wall) if t is not None else float("nan")
            leader_s.append(took)
            leader_outage.append(out)
            two_owners, samples = two_owners + bad, samples + n
            settle(lab)
            # base: the primary fails, the leader stays
            out, bad, n = measured(lab, lambda: lab.cut_link("p1"), lambda: lab.wait_owner(None, "s1", 30))
            base.append(out)
            two_owners, samples = two_owners + bad, samples + n
            settle(lab)
            # during: the primary fails as the leader dies
            old = lab.leader()

            def both(old: str = old) -> None:
                lab.cut_link("p1")
                lab.signal(controller_process(old), signal.SIGKILL)

            out, bad, n = measured(lab, both, lambda: lab.wait_owner(None, "s1", 60))
            during.append(out)
            two_owners, samples = two_owners + bad, samples + n
            say(
                f"trial {trial}: leader {killed} killed -> {new} acts after {took:.2f} s (client outage "
                f"{leader_outage[-1]:.3f} s); primary cut: outage {base[-1]:.3f} s steady, "
                f"{during[-1]:.3f} s during a leader change"
            )
            settle(lab)

    def rng(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"

    say(f"leader death -> another replica acting: {rng(leader_s)}; client outage {rng(leader_outage)}")
    say(f"primary failure, steady leader: outage {rng(base)}")
    say(f"primary failure during a leader change: outage {rng(during)}")
    say(
        f"during / steady (medians, same run): {statistics.median(during) / statistics.median(base):.2f} x; "
        f"address samples with two owners: {two_owners} of {samples}"
    )
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if two_owners else 0


def wait_new_leader(lab: Lab, old: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if [h for h, s in lab.replica_states(0.5).items() if s == "leader" and h != old]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"no new leader: {lab.replica_states()}")


if __name__ == "__main__":
    sys.exit(main())
