"""One controller replica's shards, alone in a process so that a test or benchmark can kill -9 or SIGSTOP
it: runs the real `Replica` (its shard electors, membership, shared-state reads and hand-overs; no gRPC
server, no agents) against the etcd cluster and prints every change of "may act for shard k" as sampled every
5 ms, "<CLOCK_MONOTONIC seconds> <shard> <0|1>", flushed at once (the clock is the machine's, shared by every
process). Used by tests/cluster/test_etcd_shards.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controller.cluster.journal import JournaledStore
from controller.cluster.replica import Replica
from controller.config import ClusterConfig, ControllerConfig
from lab.elector_probe import two_leaders
from lab.etcd import EtcdCluster
from lab.procs import child_env, python_module


class ShardProcess:
    """A replica in its own process (this module as its main), and what it printed."""

    def __init__(
        self, etcd: EtcdCluster, name: str, prefix: str, shards: int, workdir: Path, ttl: int = 2
    ) -> None:
        self.name, self.out, self.err = name, workdir / f"{name}.out", workdir / f"{name}.log"
        argv = python_module("lab.shard_probe", "--name", name, "--prefix", prefix, "--shards", str(shards))
        for e in etcd.endpoints:
            argv += ["--endpoint", e]
        argv += ["--ca", etcd.tls.ca, "--cert", etcd.tls.cert, "--key", etcd.tls.key, "--ttl", str(ttl)]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=err, start_new_session=True, env=child_env()
            )
        self.ended_at: float | None = None  # killed: it acted at most until here

    def transitions(self, shard: int) -> list[tuple[float, bool]]:
        rows = [line.split() for line in self.out.read_text().splitlines() if line.strip()]
        return [(float(t), a == "1") for t, k, a in rows if int(k) == shard]

    def acting(self) -> set[int]:
        """The shards it acts for, as last printed (none once killed)."""
        if self.ended_at is not None:
            return set()
        last: dict[int, bool] = {}
        for line in self.out.read_text().splitlines():
            if line.strip():
                _, k, a = line.split()
                last[int(k)] = a == "1"
        return {k for k, a in last.items() if a}

    def intervals(self, shard: int, now: float, stopped_at: float | None = None) -> list[tuple[float, float]]:
        """When it acted for `shard` (as `ElectorProcess.intervals`)."""
        out, start = [], None
        for t, a in self.transitions(shard):
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


def double_actors(
    probes: list[ShardProcess], shards: int, stopped_at: dict[str, float] | None = None
) -> list[str]:
    """Every moment two replicas acted for one shard (none: empty)."""
    now, stops, bad = time.monotonic(), stopped_at or {}, []
    for k in range(shards):
        spans = sorted((s, e, p.name) for p in probes for s, e in p.intervals(k, now, stops.get(p.name)))
        bad += [f"shard {k}: {b}" for b in two_leaders(spans)]
    return bad


def covered(probes: list[ShardProcess], shards: int) -> dict[int, list[str]]:
    """shard -> the replicas acting for it now (exactly one each when the cluster is settled)."""
    out: dict[int, list[str]] = {k: [] for k in range(shards)}
    for p in probes:
        for k in p.acting():
            out[k].append(p.name)
    return out


async def main(args: argparse.Namespace) -> None:
    cfg = ControllerConfig(
        cluster=ClusterConfig(
            name=args.name,
            etcd=args.endpoint,
            ca=Path(args.ca),
            cert=Path(args.cert),
            key=Path(args.key),
            prefix=args.prefix,
            ttl_seconds=args.ttl,
            request_timeout_seconds=min(0.5, args.ttl / 3),
            shards=args.shards,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        replica = Replica(cfg, JournaledStore(Path(tmp) / "store.db"))
        replica.start()
        last: dict[int, bool] = {}
        while True:
            for k in range(args.shards):
                acting = not replica.not_leading_shard(k)
                if acting != last.get(k, False) or k not in last:
                    print(f"{time.monotonic():.6f} {k} {int(acting)}", flush=True)
                    last[k] = acting
            await asyncio.sleep(0.005)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--endpoint", action="append", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--prefix", default="/test/shards")
    p.add_argument("--shards", type=int, default=4)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(p.parse_args()))
