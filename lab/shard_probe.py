"""One controller replica's shards, alone in a process so that a test or benchmark can kill -9 or SIGSTOP
it: runs the real `Replica` (its shard electors, membership, shared-state reads and hand-overs; no gRPC
server, no agents) against the etcd cluster and prints every change of "may act for shard k" as sampled every
5 ms, "<CLOCK_MONOTONIC seconds> <shard> <0|1>", flushed at once (the clock is the machine's, shared by every
process). Used by tests/cluster/test_etcd_shards.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from controller.cluster.journal import JournaledStore
from controller.cluster.replica import Replica
from controller.config import ClusterConfig, ControllerConfig
from lab.elector_probe import ProbeProcess, two_leaders
from lab.etcd import EtcdCluster
from lab.procs import python_module


class ShardProcess(ProbeProcess):
    """A replica in its own process (this module as its main), and what it printed."""

    def __init__(
        self, etcd: EtcdCluster, name: str, prefix: str, shards: int, workdir: Path, ttl: int = 2
    ) -> None:
        argv = python_module("lab.shard_probe", "--name", name, "--prefix", prefix, "--shards", str(shards))
        super().__init__(etcd, name, workdir, ttl, argv)

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
        """When it acted for `shard`."""
        return self.spans(self.transitions(shard), now, stopped_at)


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
