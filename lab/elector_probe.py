"""One controller replica's leadership, alone in a process so that a test or benchmark can kill -9 or
SIGSTOP it: runs the real `Elector` against the etcd cluster and prints every change of `acts()` as sampled
every 5 ms, "<CLOCK_MONOTONIC seconds> <0|1>", flushed at once (the clock is the machine's, shared by every
process). Used by tests/cluster/test_etcd_leadership.py and bench/leader_failover.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from controller.cluster.elector import Elector
from controller.cluster.etcd import EtcdDcs, EtcdTls
from controller.cluster.leadership import DEFAULT_TTL_SECONDS
from lab.etcd import EtcdCluster
from lab.procs import child_env, python_module


class ProbeProcess:
    """A probe in its own process against the etcd cluster (`argv`: its module and own arguments; the
    endpoints, TLS files and TTL are added), what it printed, and the faults a test puts on it."""

    def __init__(self, etcd: EtcdCluster, name: str, workdir: Path, ttl: int, argv: list[str]) -> None:
        self.name, self.out, self.err = name, workdir / f"{name}.out", workdir / f"{name}.log"
        for e in etcd.endpoints:
            argv += ["--endpoint", e]
        argv += ["--ca", etcd.tls.ca, "--cert", etcd.tls.cert, "--key", etcd.tls.key, "--ttl", str(ttl)]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=err, start_new_session=True, env=child_env()
            )
        self.ended_at: float | None = None  # killed: it acted at most until here

    def spans(
        self, transitions: list[tuple[float, bool]], now: float, stopped_at: float | None = None
    ) -> list[tuple[float, float]]:
        """When it acted: from each 1 to the next 0 (or its death, or now). `stopped_at` ends an interval
        that began before a SIGSTOP at the stop (a stopped process acts on nothing), once the test has
        checked that it woke up not acting."""
        out, start = [], None
        for t, a in transitions:
            if a and start is None:
                start = t
            elif not a and start is not None:
                out.append((start, t))
                start = None
        if start is not None:
            out.append((start, self.ended_at if self.ended_at is not None else now))
        if stopped_at is not None:
            out = [(s, min(e, stopped_at) if s <= stopped_at else e) for s, e in out]
        return out

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.ended_at = time.monotonic()

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class ElectorProcess(ProbeProcess):
    """A replica's elector in its own process (this module as its main), and what it printed."""

    def __init__(
        self, etcd: EtcdCluster, name: str, key: str, workdir: Path, ttl: int = DEFAULT_TTL_SECONDS
    ) -> None:
        argv = python_module("lab.elector_probe", "--name", name, "--leader-key", key)
        super().__init__(etcd, name, workdir, ttl, argv)

    def transitions(self) -> list[tuple[float, bool]]:
        rows = [line.split() for line in self.out.read_text().splitlines() if line.strip()]
        return [(float(t), a == "1") for t, a in rows]

    def acting(self) -> bool:
        t = self.transitions()
        return bool(t) and t[-1][1] and self.ended_at is None

    def intervals(self, now: float, stopped_at: float | None = None) -> list[tuple[float, float]]:
        return self.spans(self.transitions(), now, stopped_at)


def one_leader(probes: list[ElectorProcess], timeout: float) -> ElectorProcess:
    """Wait until exactly one of `probes` acts; that one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acting = [p for p in probes if p.acting()]
        if len(acting) == 1:
            return acting[0]
        time.sleep(0.02)
    raise TimeoutError(f"no single leader among {[p.name for p in probes]} after {timeout:g} s")


def acting_spans(
    probes: list[ElectorProcess], stopped_at: dict[str, float] | None = None
) -> list[tuple[float, float, str]]:
    """Every replica's acting intervals, (start, end, name), in order of start; `stopped_at`: when a
    replica was SIGSTOPped (`ElectorProcess.intervals`)."""
    now = time.monotonic()
    stops = stopped_at or {}
    return sorted((s, e, p.name) for p in probes for s, e in p.intervals(now, stops.get(p.name)))


def two_leaders(spans: list[tuple[float, float, str]]) -> list[str]:
    """Where two replicas acted at once (none: empty)."""
    bad, until, who = [], float("-inf"), ""
    for s, e, name in spans:
        if s < until:
            bad.append(f"two leaders: {who} acted until {until:.3f}, {name} from {s:.3f}")
        if e > until:
            until, who = e, name
    return bad


async def main(args: argparse.Namespace) -> None:
    dcs = EtcdDcs(args.endpoint, EtcdTls(args.ca, args.cert, args.key), timeout=args.timeout)
    elector = Elector(dcs, args.name, ttl_seconds=args.ttl, key=args.leader_key)
    task = asyncio.create_task(elector.run())
    last = None
    while not task.done():
        acting = elector.acts()
        if acting != last:
            print(f"{time.monotonic():.6f} {int(acting)}", flush=True)
            last = acting
        await asyncio.sleep(0.005)
    task.result()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--endpoint", action="append", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL_SECONDS)
    p.add_argument("--leader-key", default="/test/leader")
    p.add_argument("--timeout", type=float, default=0.5)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    asyncio.run(main(p.parse_args()))
