"""Controller replicas' leadership through etcd, measured with the production code path and defaults: the
real `Elector` (lab/elector_probe.py, one process per replica, TTL and margin as shipped) against a real
3-member etcd cluster (Debian's etcd-server, mutual TLS, on loopback).

    .venv/bin/python bench/leader_failover.py [--trials 10] [--out bench/results/leader_failover.txt]

For each trial: kill -9 of the acting leader, then the time until another replica acts (and a fresh replica
started in its place, so that three always campaign). Then etcd stopped entirely (every member SIGSTOPped):
how long the leader keeps acting without it (fail-static: it must stop within TTL x (1 - margin)), and how
long after etcd returns a leader acts again. Every replica's acting intervals are laid side by side over the
whole run: samples with two leaders must be none. Leaves nothing behind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.cluster.leadership import DEFAULT_MARGIN, DEFAULT_TTL_SECONDS
from lab.elector_probe import ElectorProcess, acting_spans, one_leader, two_leaders
from lab.etcd import EtcdCluster

TIMEOUT = 0.5  # the probe's etcd request timeout (lab/elector_probe.py default)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ttl, margin = DEFAULT_TTL_SECONDS, DEFAULT_MARGIN
    lines = [
        f"# bench/leader_failover.py --trials {args.trials}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}",
        f"defaults: TTL {ttl} s, margin {margin}, renewal every {ttl / 3:g} s (Elector.run), etcd request "
        f"timeout {TIMEOUT} s; etcd: 3 members, mutual TLS, loopback",
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)
    with tempfile.TemporaryDirectory(prefix="sp-leader-") as tmp:
        work = Path(tmp)
        etcd = EtcdCluster.start(work / "etcd")
        key = f"/bench/leader/{uuid.uuid4().hex}"
        everyone: list[ElectorProcess] = []
        try:
            live = [ElectorProcess(etcd, f"r{i}", key, work, ttl) for i in range(1, 4)]
            everyone += live
            takeovers = []
            for trial in range(args.trials):
                first = one_leader(live, 30)
                time.sleep(ttl)  # a steady leader, renewing
                first.kill9()
                live.remove(first)
                second = one_leader(live, 30)
                took = second.intervals(time.monotonic())[-1][0] - (first.ended_at or 0.0)
                takeovers.append(took)
                say(f"trial {trial + 1}: kill -9 of {first.name}; {second.name} acts {took:.2f} s later")
                fresh = ElectorProcess(etcd, f"r{len(everyone) + 1}", key, work, ttl)
                live.append(fresh)
                everyone.append(fresh)
            one_leader(live, 30)
            time.sleep(ttl)
            for m in etcd.members:
                etcd.pause(m.name)
            paused = time.monotonic()
            time.sleep(3 * ttl)
            still = [p.name for p in live if p.acting()]
            last_act = max(e for p in live for _, e in p.intervals(time.monotonic()))
            for m in etcd.members:
                etcd.resume(m.name)
            resumed = time.monotonic()
            back = one_leader(live, 60)
            again = back.intervals(time.monotonic())[-1][0] - resumed
            bad = two_leaders(acting_spans(everyone))
        finally:
            for p in everyone:
                p.stop()
            etcd.down()
    say("")
    say(
        f"leader killed (kill -9) -> another acts: median {statistics.median(takeovers):.2f} s, "
        f"min {min(takeovers):.2f} s, max {max(takeovers):.2f} s over {len(takeovers)} trials "
        f"(bound: TTL {ttl} s for etcd to expire the lease + one campaign interval {ttl / 3:g} s + requests)"
    )
    say(
        f"etcd stopped entirely: the leader acted {last_act - paused:.2f} s more (bound TTL x (1 - margin) "
        f"= {ttl * (1 - margin):.2f} s after its last confirmed renewal was sent); acting after {3 * ttl} s: "
        f"{still or 'nobody'}; etcd back -> a leader acts {again:.2f} s later"
    )
    say(f"samples with two acting leaders over the whole run: {len(bad)} {bad[:3] if bad else ''}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if bad or still else 0


if __name__ == "__main__":
    sys.exit(main())
